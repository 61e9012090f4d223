"""Episodes: one detector's evidence, one change at a time (pure).

While a slice stays open, the detect stage reports its evidence since the detector's *first*
onset, across re-crossings. The book differences consecutive messages of a firing to count the
events in between (:func:`diff_counts`), sums them per episode (:func:`add_counts`), and
starts a new episode when the change had stopped in between (:func:`episode_split`), from the
re-crossing's own counts (:func:`new_episode_counts`).

An open alarm's counts come from a tally (they carry ``missed``): cumulative from a fixed
start, so consecutive messages difference exactly. Counts without ``missed`` (checkpoints
written before tallies) are the detect stage's 4-h ring, which drops old buckets: their
differences are clipped at zero and marked ``truncated``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from driftline.alerts.evidence import effect, signature
from driftline.alerts.model import Firing, SliceEvidence, utc

_SCALARS = ("n", "n_ood", "ood", "ood_expected", "missed")


def diff_counts(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """Counts of the events between two messages of one episode (cumulative since the same
    onset): ``now - before``. Between two counts of one tally that is exact, and complete
    even when the tally's own start was ``truncated``; ring counts are clipped at zero where
    old buckets were dropped, and stay ``truncated``."""
    if not before:
        return dict(now)
    exact = "missed" in now and "missed" in before
    out: dict[str, Any] = {"truncated": not exact and bool(now.get("truncated"))}
    for key in _SCALARS:
        out[key] = max((now.get(key) or 0) - (before.get(key) or 0), 0)
    for key in ("clusters", "expected"):
        a, b = now.get(key) or [], before.get(key) or []
        out[key] = [max(x - y, 0) for x, y in zip(a, b, strict=False)] if len(a) == len(b) \
            else list(a)
    return out


def add_counts(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, Any]:
    """Counts of two adjacent ranges of events."""
    if not a:
        return dict(b)
    out: dict[str, Any] = {"truncated": bool(a.get("truncated") or b.get("truncated"))}
    for key in _SCALARS:
        out[key] = (a.get(key) or 0) + (b.get(key) or 0)
    for key in ("clusters", "expected"):
        x, y = a.get(key) or [], b.get(key) or []
        out[key] = [u + v for u, v in zip(x, y, strict=True)] if len(x) == len(y) else list(y)
    return out


def new_episode_counts(msg: Mapping[str, Any], delta: dict[str, Any] | None
                       ) -> dict[str, Any] | None:
    """A new episode's counts at the re-crossing that starts it: the detect stage's counts
    since the re-crossing's own onset (``excursion``: none from the quiet spell before it),
    else ``delta``, the events since the last message (which holds that quiet spell too)."""
    return (msg.get("evidence") or {}).get("excursion") or delta


def episode_split(f: Firing, msg: Mapping[str, Any], delta: dict[str, Any] | None, *,
                  gap_events: int, gap_s: float
                  ) -> tuple[datetime | None, dict[str, Any] | None] | None:
    """``(onset, counts)`` of the new episode this re-crossing starts, or ``None``.

    After a crossing the detector restarts; if it sat near zero for ``gap_events``
    before climbing again (its ``onset_index``), the change had stopped and this is a new
    one: its onset is interpolated from the events between the two messages, its evidence
    is the difference of their counts. So is a re-crossing ``gap_s`` of event time
    after the last one when the slice's events paused in between (fewer than half what the
    episode's pace gives: a slice that only sees events on the night shift, each night an
    episode, which rejoins the incident while that is open) — not when they kept coming, as
    for a slow slice whose detector takes longer than ``gap_s`` to cross again."""
    oi, n_now, n_then = msg.get("onset_index"), msg.get("slice_n"), f.episode.slice_n
    at = utc(msg["time"])
    elapsed = at - f.last_detected
    n_ep = int((f.episode.counts or {}).get("n") or 0)
    pace = (f.last_detected - f.onset) / n_ep if f.onset and n_ep > 0 else None
    # a pause is a gap in the slice's events, not a long climb of a slow slice's detector:
    # events kept coming at half the episode's pace or more, so its stream went on
    streamed = (pace is not None and n_now is not None and n_then is not None
                and (n_now - n_then) * pace >= elapsed / 2)
    if elapsed.total_seconds() >= gap_s and not streamed:
        # Events resumed after a pause: back from now by the climb, at the old pace.
        climb = (n_now - n_then - (oi or 0)) if n_now is not None and n_then is not None \
            else None
        onset = at - climb * pace if pace is not None and climb and climb > 0 else at
        return max(onset, f.last_detected), delta
    if oi is None or oi < gap_events:
        return None
    step = ((at - f.last_detected) / (n_now - n_then)
            if n_now is not None and n_then is not None and n_now > n_then else None)
    # Never after this crossing: in a slice that mixes stations (a lot, a shift) event times
    # go back and forth with the order the stations' partitions are read, so ``at`` may be
    # earlier than the last crossing, and the interpolation lands between them, after ``at``.
    return (min(f.last_detected + oi * step, at) if step is not None else at), delta


def episode_cells(doc: Mapping[str, Any], start: Mapping[str, Any] | None) -> dict[str, Any]:
    """An episode's own cells: the alarm's (cumulative since it was raised, one row per cell
    ``[station, shift, lot, n, ...counts]``, plus an ``overflow`` row) less those it had when
    the episode began; cells with no events since are dropped. Without ``start`` (the
    alarm's first episode) the alarm's cells are the episode's."""
    if not start:
        return dict(doc)
    before = {tuple(r[:3]): r[3:] for r in start.get("cells") or []}
    rows = []
    for r in doc.get("cells") or []:
        b = before.get(tuple(r[:3]))
        row = [*r[:3], *(max(x - y, 0) for x, y in zip(r[3:], b, strict=False))] if b else list(r)
        if row[3] > 0:
            rows.append(row)
    over, over0 = list(doc.get("overflow") or []), list(start.get("overflow") or [])
    if over and len(over0) == len(over):
        over = [max(x - y, 0) for x, y in zip(over, over0, strict=True)]
    return {**doc, "cells": rows, "overflow": over or doc.get("overflow")}


def _newer_cells(first: SliceEvidence, second: SliceEvidence) -> dict[str, dict[str, Any]]:
    """Per detector, the cells that counted more events (cumulative since the alarm)."""
    out = dict(first.cells)
    for det, doc in second.cells.items():
        if det not in out or _cells_n(doc) >= _cells_n(out[det]):
            out[det] = doc
    return out


def _cells_n(doc: Mapping[str, Any]) -> int:
    return int(sum(r[3] for r in doc.get("cells") or []) + (doc.get("overflow") or [0])[0])


def combine(a: SliceEvidence, b: SliceEvidence) -> SliceEvidence:
    """One slice's evidence from two episodes of the same incident."""
    first, second = (a, b) if (a.onset or a.last_time or datetime.max.replace(
        tzinfo=UTC)) <= (b.onset or b.last_time or datetime.max.replace(tzinfo=UTC)) else (b, a)
    if not first.counts or not second.counts:
        return second.model_copy(update={"cells": _newer_cells(first, second)})
    strength, mix, displaced = effect(add_counts(first.counts, second.counts))
    out = second.model_copy(update={
        "counts": add_counts(first.counts, second.counts), "strength": strength,
        "mix_shift": mix, "displaced": displaced, "onset": first.onset,
        "first_time": first.first_time, "cells": _newer_cells(first, second),
        "n_since_onset": first.n_since_onset + second.n_since_onset})
    out.signature = signature(out.counts)
    return out
