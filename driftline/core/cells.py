"""Per-cell counts of one open alarm: where in the slice the change is.

Every event belongs to one slice of each template, so one physical change makes several
slices alarm; the failure book names the root by *co-occurrence*: which slice's alarm is made
of the same events as the others' (:mod:`driftline.alerts.cooccurrence`). What an alarmed slice
shares with another is its *cells*, the finest partition of events the slice dimensions give —
one ``(station, shift, lot)`` each. While an alarm is open its slice counts, per cell, from the
alarm on:

* ``n``: events; ``ood``: OOD hits; ``ood_expected``: the hits the events' baselines expect
  (the sum of their stated OOD rates);
* ``hits``/``hits_expected``: events in the alarm's *watched* cluster and the sum of their
  baselines' share of it — for a cluster-mix alarm the cluster its alarming CUSUM said mass
  moved into (or out of); none for other detectors.

The cluster-mix part is one Bernoulli per cell, not the full K-cluster mix: the alarm is about
one cluster's share (that is the member of the CUSUM bank that crossed), its per-cell version is
the same test restricted to the cell, and it costs two numbers per cell instead of 2·K. Counts
add, so the book can compare cells of different slices' alarms by key whatever order they came
in.

At most ``max_cells`` cells are kept apart (a shift spans every station and lot); events of
further cells are pooled in one ``overflow`` row, whose ``n`` says how many events could not be
placed. A slice costs nothing here while it has no open alarm; with one open, a dict look-up
and a few additions per event.
"""

from __future__ import annotations

from typing import Any

MAX_CELLS = 64
Cell = tuple[str, str, str]

# row layout: [n, ood, ood_expected, hits, hits_expected]
_N, _OOD, _OOD_EXP, _HITS, _HITS_EXP = range(5)


class CellTally:
    """Per-cell counts since an alarm was raised; ``watch`` is the cluster its CUSUM watches.

    >>> import numpy as np
    >>> t = CellTally(watch=1, direction="into", max_cells=1)
    >>> p = np.array([0.9, 0.1])
    >>> t.update(("s1", "day", "L1"), 1, p, ood=True, ood_p0=0.01)
    >>> t.update(("s2", "day", "L1"), 0, p, ood=False, ood_p0=0.01)
    >>> d = t.as_dict()
    >>> d["cells"][0][:4], d["overflow"][0]
    (['s1', 'day', 'L1', 1], 1)
    """

    __slots__ = ("watch", "direction", "max_cells", "_rows", "_overflow")

    def __init__(self, watch: int | None = None, direction: str | None = None,
                 max_cells: int = MAX_CELLS) -> None:
        self.watch = watch
        self.direction = direction
        self.max_cells = int(max_cells)
        self._rows: dict[Cell, list[float]] = {}
        self._overflow = [0, 0, 0.0, 0, 0.0]

    def update(self, cell: Cell, cluster: int, p: Any, *, ood: bool | None,
               ood_p0: float | None) -> None:
        """Count one event of ``cell`` (its cluster, its baseline's mix ``p`` and OOD rate)."""
        row = self._rows.get(cell)
        if row is None:
            if len(self._rows) < self.max_cells:
                row = self._rows[cell] = [0, 0, 0.0, 0, 0.0]
            else:
                row = self._overflow
        row[_N] += 1
        if ood is not None and ood_p0 is not None:
            row[_OOD] += ood
            row[_OOD_EXP] += ood_p0
        w = self.watch
        if w is not None:
            row[_HITS] += cluster == w
            row[_HITS_EXP] += float(p[w])

    @property
    def n(self) -> int:
        return int(sum(r[_N] for r in self._rows.values()) + self._overflow[_N])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``cells`` rows ``[station, shift, lot, n, ood, ood_expected, hits,
        hits_expected]`` (sorted), the ``overflow`` row's counts, the watched cluster."""
        return {"watch": self.watch, "direction": self.direction,
                "cells": [[*c, *_row(r)] for c, r in sorted(self._rows.items())],
                "overflow": _row(self._overflow)}

    snapshot = as_dict

    @classmethod
    def restore(cls, snap: dict[str, Any], max_cells: int = MAX_CELLS) -> CellTally:
        obj = cls(snap.get("watch"), snap.get("direction"), max_cells)
        for row in snap.get("cells") or ():
            obj._rows[(str(row[0]), str(row[1]), str(row[2]))] = _row(row[3:])
        obj._overflow = _row(snap.get("overflow") or [0, 0, 0.0, 0, 0.0])
        return obj


def _row(v: Any) -> list[float]:
    """A row's counts in their types (ints counted, floats summed): for JSON and on restore."""
    return [int(v[_N]), int(v[_OOD]), float(v[_OOD_EXP]), int(v[_HITS]), float(v[_HITS_EXP])]
