"""Root slices by co-occurrence: which alarmed slices are made of the same changed events (pure).

One physical change makes every slice holding its events alarm. Each alarm carries, since it
was raised, its events' counts per *cell* — station × shift × lot, the finest partition the
slice dimensions give (:mod:`driftline.core.cells`) — so the book can see *where* in a slice the
excess sits, and which other alarmed slices have it in the same cells. Attribution is then a
function of the set of alarmed slices and their cells alone, whatever order they arrived in:

1. **Affected cells.** Per alarmed slice and detector, a cell is affected when its count of the
   alarm's measure (OOD hits; for a cluster-mix alarm, events in the watched cluster) is above
   what its events' baselines expect, beyond chance and beyond a floor: the one-sided binomial
   tail ``P(X ≥ x | n, p0) < alpha / m`` (Bonferroni over the slice's ``m`` cells: at most
   ``alpha`` chance that a slice with no change shows any affected cell) and the cell's rate at
   least ``min_effect`` above ``p0`` (a cell where a tenth of the events moved is one a change
   is in; a cell a change merely brushes is not where it is). A cluster that lost mass is read
   the other way (lower tail, rate ``min(min_effect, p0/2)`` below). The cell's *excess* is
   ``|x − n·p0|``, events moved.
2. **Precision and excess.** ``precision(R)``: the share of ``R``'s counted events in its
   affected cells; ``excess(R)``: the excess of its affected cells.
3. **Greedy cover.** Among slices with precision at least ``min_precision`` (most of the slice
   is the change: a shift that mixes one bad station with three good ones is not a root), pick
   the one with the largest *new* excess (in affected cells no root so far has) × precision;
   ties go to the more local template (station+shift, station, lot, shift) and then to the
   id. It is a root; its affected cells are explained. Stop when no slice has at least
   ``min_new_share`` of its excess (and ``min_excess`` events) unexplained.
4. **Joining.** Every other slice joins the root whose affected cells hold most of its own
   affected excess, if that is at least ``min_join_share``. One that no root explains but
   with at least ``min_excess`` events of excess is a change of its own: a root of one. One
   with no affected cell is *noise* (the alarm's events since it was raised show nothing
   located): it is related to the compatible root it shares most events with, never an
   incident; with no compatible root it is left to the rules for alarms without cells.

A slice whose cells count fewer than ``min_events`` events is not read: an alarm's cells start
when it is raised, and until they fill the book places it by its totals
(:mod:`driftline.alerts.attribution`), as it does alarms from detect workers that send no cells.
The windows of two slices' cells need not be the same; the cells are compared by key.

Reference: greedy set cover (Chvátal, "A greedy heuristic for the set-covering problem", Math.
Oper. Res. 4, 1979) over cells weighted by excess; the affected-cell test is a per-cell exact
binomial test with a Bonferroni bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import bdtr, bdtrc

from driftline.alerts.attribution import compatible, template_rank
from driftline.alerts.model import SliceEvidence, SliceRef

Cell = tuple[str, str, str]


@dataclass(frozen=True)
class CooccurrencePolicy:
    """Thresholds of the co-occurrence attribution (see the module docstring)."""

    alpha: float = 0.01
    min_effect: float = 0.1
    min_events: int = 30
    min_precision: float = 0.5
    min_excess: float = 5.0
    min_new_share: float = 0.2
    min_join_share: float = 0.3
    persist_alpha: float = 0.001


@dataclass(frozen=True)
class SliceCells:
    """One alarmed slice's cells as attribution reads them."""

    ref: SliceRef
    n: dict[Cell, int]  # events per cell (the most any of its detectors counted)
    affected: dict[Cell, float]  # excess per affected cell
    pooled: int = 0  # events no cell could hold

    @property
    def excess(self) -> float:
        return sum(self.affected.values())

    @property
    def precision(self) -> float:
        total = sum(self.n.values()) + self.pooled
        return sum(self.n[c] for c in self.affected) / total if total else 0.0


@dataclass
class Plan:
    """Roots in cover order, and every slice read → its root (roots and lone changes →
    themselves); ``noise`` the slices read that showed no affected cell."""

    roots: list[str] = field(default_factory=list)
    root_of: dict[str, str] = field(default_factory=dict)
    alone: set[str] = field(default_factory=set)
    noise: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)


def _measure(doc: Mapping[str, Any]) -> tuple[int, int, str]:
    """Columns ``(x, expected)`` of a cells row's counts the alarm is about (after ``n``),
    and which way it moved."""
    if doc.get("watch") is not None:
        return 3, 4, "out" if doc.get("direction") == "out" else "into"
    return 1, 2, "into"


def _affected(doc: Mapping[str, Any], policy: CooccurrencePolicy) -> dict[Cell, float]:
    rows = doc.get("cells") or []
    if not rows:
        return {}
    xi, ei, direction = _measure(doc)
    a = np.array([r[3:] for r in rows], np.float64)
    n, x, e = a[:, 0], a[:, xi], a[:, ei]
    ok = (n > 0) & (e > 0)
    p0 = np.where(ok, e / np.maximum(n, 1), 0.5).clip(1e-12, 1 - 1e-12)
    rate = x / np.maximum(n, 1)
    level = policy.alpha / len(rows)
    n_i = n.astype(np.int64)
    if direction == "into":
        tail = bdtrc(x - 1, n_i, p0)  # P(X >= x)
        big = rate - p0 >= policy.min_effect
    else:
        tail = bdtr(x, n_i, p0)  # P(X <= x)
        big = p0 - rate >= np.minimum(policy.min_effect, p0 / 2)
    hit = ok & (tail < level) & big
    return {(str(r[0]), str(r[1]), str(r[2])): float(abs(x[i] - e[i]))
            for i, r in enumerate(rows) if hit[i]}


def read_cells(ev: SliceEvidence, policy: CooccurrencePolicy) -> SliceCells | None:
    """``ev``'s cells as attribution reads them; None without cells or too few events."""
    n: dict[Cell, int] = {}
    affected: dict[Cell, float] = {}
    pooled = 0
    for _, doc in sorted(ev.cells.items()):
        for r in doc.get("cells") or []:
            c = (str(r[0]), str(r[1]), str(r[2]))
            n[c] = max(n.get(c, 0), int(r[3]))
        pooled = max(pooled, int((doc.get("overflow") or [0])[0]))
        for c, x in _affected(doc, policy).items():
            affected[c] = max(affected.get(c, 0.0), x)
    if sum(n.values()) + pooled < policy.min_events:
        return None
    return SliceCells(ev.ref, n, affected, pooled)


class CellReader:
    """:func:`read_cells` remembered per evidence object and its cells (one book batch reads
    the same alarms once per placement and once per finish)."""

    def __init__(self, policy: CooccurrencePolicy) -> None:
        self.policy = policy
        self._seen: dict[int, tuple[SliceEvidence, Any, SliceCells | None]] = {}

    def __call__(self, ev: SliceEvidence) -> SliceCells | None:
        hit = self._seen.get(id(ev))
        if hit is not None and hit[0] is ev and hit[1] is ev.cells:
            return hit[2]
        sc = read_cells(ev, self.policy)
        self._seen[id(ev)] = (ev, ev.cells, sc)  # holding ev: its id is not reused meanwhile
        return sc


def attribute(members: Sequence[SliceEvidence],
              policy: CooccurrencePolicy = CooccurrencePolicy(),
              reader: CellReader | None = None) -> Plan:
    """The roots of ``members`` and where each slice goes (see the module docstring)."""
    read = reader or CellReader(policy)
    cells = {ev.ref.slice_id: sc for ev in members if (sc := read(ev)) is not None}
    plan = Plan(read=set(cells))
    explained: set[Cell] = set()
    while True:
        best: tuple[tuple[float, int, str], str] | None = None
        for sid, sc in cells.items():
            if sid in plan.roots or not sc.affected or sc.precision < policy.min_precision:
                continue
            new = sum(x for c, x in sc.affected.items() if c not in explained)
            if new < max(policy.min_excess, policy.min_new_share * sc.excess):
                continue
            key = (new * sc.precision, template_rank(sc.ref), sid)
            if best is None or key > best[0]:
                best = (key, sid)
        if best is None:
            break
        plan.roots.append(best[1])
        explained |= set(cells[best[1]].affected)
    for r in plan.roots:
        plan.root_of[r] = r
    for sid in sorted(cells):
        if sid in plan.root_of:
            continue
        sc = cells[sid]
        share, root = 0.0, None
        for r in plan.roots:  # cover order: the earlier root wins ties
            common = sum(x for c, x in sc.affected.items() if c in cells[r].affected)
            if sc.excess > 0 and common / sc.excess > share:
                share, root = common / sc.excess, r
        if root is not None and share >= policy.min_join_share:
            plan.root_of[sid] = root
        elif sc.excess >= policy.min_excess:
            plan.roots.append(sid)
            plan.alone.add(sid)
            plan.root_of[sid] = sid
        else:
            plan.noise.add(sid)
    for sid in sorted(plan.noise):
        sc = cells[sid]
        near = [(sum(sc.n[c] for c in sc.n if c in cells[r].n), -i, r)
                for i, r in enumerate(plan.roots) if compatible(sc.ref, cells[r].ref)]
        if near:
            plan.root_of[sid] = max(near)[2]
    return plan


def totals(cells: Mapping[str, Mapping[str, Any]], detector: str) -> list[float] | None:
    """``[n, x, expected]`` of ``detector``'s cells summed (its measure, see
    :func:`_measure`), with the overflow; None without its cells."""
    doc = cells.get(detector)
    if not doc:
        return None
    xi, ei, _ = _measure(doc)
    rows = [r[3:] for r in doc.get("cells") or []] + [list(doc.get("overflow") or [0] * 5)]
    return [float(sum(r[0] for r in rows)), float(sum(r[xi] for r in rows)),
            float(sum(r[ei] for r in rows))]


def direction(cells: Mapping[str, Mapping[str, Any]], detector: str) -> str:
    return _measure(cells.get(detector) or {})[2]


def persisted(before: Sequence[float], now: Sequence[float], direction: str,
              policy: CooccurrencePolicy = CooccurrencePolicy(),
              episode: Sequence[float] | None = None) -> bool:
    """Between two messages of one alarm (cell totals from :func:`totals`, cumulative since it
    was raised), *its* change went on: the re-crossing is not a new episode.

    The events in between are clearly off the reference (one-sided exact binomial test at
    ``persist_alpha``) and, of the two rates, closer to the alarm's own so far (its measure
    over expected, applied to their expected rate; ``episode``, the cell totals of the
    episode so far, else ``before``) than to the reference (likelihood ratio):
    a moderate change that kept on, whose detector sat near zero only because it climbs
    slowly. A strong change that stopped is not kept on by the next change beginning within
    those events, nor by a little noise off the reference (a lot that ran out, then the
    station's haze setting in)."""
    n, x, e = (now[i] - before[i] for i in range(3))
    own = episode if episode is not None else before
    if n <= 0 or e <= 0 or own[2] <= 0:
        return False
    p0 = min(max(e / n, 1e-12), 1 - 1e-12)
    k = int(round(n))
    tail = float(bdtrc(x - 1, k, p0) if direction != "out" else bdtr(x, k, p0))
    if tail >= policy.persist_alpha:
        return False
    p1 = min(max(p0 * own[1] / own[2], 1e-12), 1 - 1e-12)  # the change's rate so far
    llr = x * np.log(p1 / p0) + (n - x) * np.log((1 - p1) / (1 - p0))
    return bool(llr > 0)
