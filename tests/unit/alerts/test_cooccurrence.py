"""Root slices by co-occurrence of per-cell evidence: exact roots, whatever the order.

A synthetic fleet (four stations, two shifts, four lots; every event in one cell) with three
changes at once — station S1's optics, station S2's night lighting, lot L3 at stations S1–S3 —
and one false alarm (S4's day shift, clean). Every slice holding changed events alarms; each
sends an ``alarm`` whose cells have barely started, then an ``update`` with its cells since.
The book must name exactly the three roots, put every other slice under one of them and open
no incident for the false alarm, for any interleaving and batching of the messages."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.cooccurrence import CooccurrencePolicy, attribute, persisted, read_cells
from driftline.alerts.evidence import slice_evidence
from driftline.alerts.grouping import Grouper
from driftline.alerts.model import Incident, Status, TimelineEntry
from driftline.schema import parse_slice_id, slice_id

ONSET = 1_700_000_000.0
STATIONS, SHIFTS, LOTS = ["S1", "S2", "S3", "S4"], ["day", "night"], ["L1", "L2", "L3", "L4"]
P0, BAD = 0.01, 0.3
ROOTS = {"station=S1", "station=S2|shift=night", "lot=L3"}
NOISE = "station=S4|shift=day"
PER_CELL = 60


def changed(st: str, sh: str, lot: str) -> bool:
    return st == "S1" or (st == "S2" and sh == "night") or (lot == "L3" and st != "S4")


def _slices() -> list[str]:
    out = set()
    for st, sh, lot in itertools.product(STATIONS, SHIFTS, LOTS):
        dims = {"station": st, "shift": sh, "lot": lot}
        for t in ("station", "station+shift", "shift", "lot"):
            out.add(slice_id(t, dims))
    return sorted(out)


def _rows(seed: int) -> dict[tuple[str, str, str], list[float]]:
    rng = np.random.default_rng(seed)
    return {c: [PER_CELL, int(rng.binomial(PER_CELL, BAD if changed(*c) else P0)),
                PER_CELL * P0, 0, 0.0]
            for c in itertools.product(STATIONS, SHIFTS, LOTS)}


def _in(sid: str, cell: tuple[str, str, str]) -> bool:
    dims = dict(zip(("station", "shift", "lot"), cell, strict=True))
    return all(dims[k] == v for k, v in parse_slice_id(sid).items())


def _msg(sid: str, kind: str, rows: dict[tuple[str, str, str], list[float]], share: float,
         t: float) -> dict[str, Any]:
    mine = {c: [round(r[0] * share), round(r[1] * share), r[2] * share, 0, 0.0]
            for c, r in rows.items() if _in(sid, c)}
    n, ood = sum(r[0] for r in mine.values()), sum(r[1] for r in mine.values())
    dims = parse_slice_id(sid)
    k = 8
    return {"kind": kind, "detector": "ood_rate", "statistic": 12.0, "threshold": 11.0,
            "onset_index": 3, "onset_time": ONSET, "argmax": {"rho": 5.0}, "time": t,
            "slice_n": 1000 + n, "dims": dims, "slice_id": sid, "template": "+".join(dims),
            "evidence": {
                "counts": {"n": n, "clusters": [n // k] * (k - 1) + [n - (k - 1) * (n // k)],
                           "expected": [n / k] * k, "n_ood": n, "ood": ood,
                           "ood_expected": P0 * n, "truncated": False, "missed": 0},
                "cells": {"watch": None, "direction": None, "overflow": [0, 0, 0.0, 0, 0.0],
                          "cells": [[*c, *r] for c, r in sorted(mine.items())]},
                "exemplars": [], "model_versions": {}}}


def alarmed(seed: int) -> list[str]:
    rows = _rows(seed)
    return [s for s in _slices() if any(changed(*c) for c in rows if _in(s, c))] + [NOISE]


def messages(seed: int, cells: bool = True) -> list[list[dict[str, Any]]]:
    """Per alarmed slice: an alarm (its cells a tenth full: not read yet), then an update."""
    rows = _rows(seed)
    out = []
    for i, s in enumerate(alarmed(seed)):
        msgs = [_msg(s, "alarm", rows, 0.1, ONSET + 300 + i),
                _msg(s, "update", rows, 1.0, ONSET + 900 + i)]
        if not cells:
            for m in msgs:
                del m["evidence"]["cells"]
        out.append(msgs)
    return out


def summary() -> dict[str, SliceStatus]:
    return {s: SliceStatus.from_summary(s, {"template": "+".join(parse_slice_id(s)),
                                            "dims": parse_slice_id(s), "n": 2000,
                                            "last_time": ONSET + 900, "ratios": {},
                                            "open": []}) for s in _slices()}


def replay(per_slice: list[list[dict[str, Any]]], order_seed: int) -> list[Incident]:
    """The messages interleaved at random (each slice's in its order), in random batches."""
    rng = random.Random(order_seed)
    queues = [list(q) for q in per_slice]
    stream = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        stream.append(q.pop(0))
    ids = itertools.count(1)
    incidents: dict[str, Incident] = {}
    k = 0
    while k < len(stream):
        size = rng.randint(1, 12)
        g = Grouper([i for i in incidents.values() if i.active], summary(),
                    now=datetime(2026, 1, 5, 8, tzinfo=UTC),
                    new_id=lambda: f"DL-{next(ids):06d}", signatures=dict)
        for m in stream[k:k + size]:
            g.apply(m)
        g.finish()
        incidents.update(g.incidents)
        k += size
    return [i for i in incidents.values() if i.merged_into is None and i.active]


def test_affected_cells_precision_and_cover() -> None:
    rows = _rows(0)
    evs = [slice_evidence(_msg(s, "update", rows, 1.0, ONSET + 900)) for s in alarmed(0)]
    policy = CooccurrencePolicy()
    cells = {e.ref.slice_id: read_cells(e, policy) for e in evs}
    s1 = cells["station=S1"]
    assert s1 is not None and s1.precision == 1.0 and len(s1.affected) == 8
    noise = cells[NOISE]
    assert noise is not None and not noise.affected  # clean cells: none affected
    plan = attribute(evs)
    assert set(plan.roots) == ROOTS and plan.noise == {NOISE}
    assert plan.root_of["station=S1|shift=day"] == "station=S1"
    assert plan.root_of["station=S2"] == "station=S2|shift=night"
    assert plan.root_of["shift=day"] in ROOTS and NOISE in plan.root_of  # attached, no root


def test_unread_until_the_cells_fill() -> None:
    ev = slice_evidence(_msg("station=S1", "alarm", _rows(0), 0.1, ONSET + 300))
    assert read_cells(ev, CooccurrencePolicy(min_events=100)) is None


@pytest.mark.parametrize("seed", range(3))
def test_three_roots_whatever_the_order(seed: int) -> None:
    per_slice = messages(seed)
    results = set()
    for order in range(8):
        live = replay(per_slice, 100 * seed + order)
        roots = sorted(i.root.slice_id for i in live)
        assert roots == sorted(ROOTS), (order, [(i.root.slice_id, sorted(i.slices))
                                                 for i in live])
        held = [s for i in live for s in i.slices]
        assert sorted(held) == sorted(alarmed(seed))  # every alarm in one incident
        results.add(tuple(sorted((i.root.slice_id, tuple(sorted(i.slices))) for i in live)))
    assert len(results) == 1  # the same incidents, whatever the order


def test_without_cells_the_book_places_by_totals() -> None:
    # messages from detect workers that send no cells: the rules by totals place them
    live = replay(messages(0, cells=False), 0)
    assert live and all(not ev.cells for i in live for ev in i.slices.values())


def test_cells_reshape_incidents_keeping_ids_and_acknowledgements() -> None:
    """The first alarms carry no readable cells and are grouped by totals; once the cells
    fill, the incidents are re-rooted, split and merged to the co-occurrence plan — recorded,
    the oldest ids kept, and an acknowledgement on a merged incident carried over."""
    per_slice = messages(0)
    ids = itertools.count(1)
    now = datetime(2026, 1, 5, 8, tzinfo=UTC)
    g = Grouper([], summary(), now=now, new_id=lambda: f"DL-{next(ids):06d}", signatures=dict)
    for q in per_slice:
        g.apply(q[0])
    g.finish()
    first = {i.id: i for i in g.incidents.values() if i.active}
    for inc in first.values():
        inc.status = Status.acknowledged
        inc.timeline.append(TimelineEntry(at=now, who="alice", action="acknowledged"))
    g = Grouper(list(first.values()), summary(), now=now,
                new_id=lambda: f"DL-{next(ids):06d}", signatures=dict)
    for q in per_slice:
        g.apply(q[1])
    g.finish()
    live = [i for i in g.incidents.values() if i.active]
    assert sorted(i.root.slice_id for i in live) == sorted(ROOTS)
    kept = [i for i in live if i.id in first]
    assert kept  # ids stay where an incident lives on
    merged = [i for i in g.incidents.values() if i.merged_into]
    for m in merged:
        into = g.incidents[m.merged_into]
        assert into.status is Status.acknowledged
        assert any(e.action == "acknowledged" and e.note and m.id in e.note
                   for e in into.timeline)
    actions = {c.action for c in g.changes}
    assert actions & {"rerooted", "split", "merged"}


def test_a_false_alarm_acknowledged_alone_ends_related_and_acknowledged() -> None:
    """The false alarm came first and opened an incident that on-call acknowledged; its cells
    show nothing located: it ends related to a root, and the acknowledgement goes with it."""
    per_slice = messages(1)
    noise = next(q for q in per_slice if q[0]["slice_id"] == NOISE)
    rest = [q for q in per_slice if q is not noise]
    ids = itertools.count(1)
    now = datetime(2026, 1, 5, 8, tzinfo=UTC)
    incidents: dict[str, Incident] = {}
    for batch in ([noise[0]], [q[0] for q in rest], [noise[1], *(q[1] for q in rest)]):
        g = Grouper([i for i in incidents.values() if i.active], summary(), now=now,
                    new_id=lambda: f"DL-{next(ids):06d}", signatures=dict)
        for m in batch:
            g.apply(m)
        g.finish()
        incidents.update(g.incidents)
        if len(incidents) == 1:
            (alone,) = incidents.values()
            alone.status = Status.acknowledged
            alone.timeline.append(TimelineEntry(at=now, who="alice", action="acknowledged"))
    live = [i for i in incidents.values() if i.active]
    assert sorted(i.root.slice_id for i in live) == sorted(ROOTS)
    (holder,) = [i for i in live if NOISE in i.slices]
    assert holder.status is Status.acknowledged


def test_persisted_is_the_alarm_s_own_change_going_on() -> None:
    # an alarm at half its events OOD (reference 1.7 %): 183 events later with 20 OOD is off
    # the reference, but nowhere near that change — it stopped (the demo's lot at surf-1, then
    # noise and the haze's first events)
    before, p0 = [104.0, 51.0, 1.72], 0.0165
    assert not persisted(before, [287.0, 71.0, 1.72 + 183 * p0], "into")
    # a moderate change (10 %) that went on at its rate
    moderate = [200.0, 20.0, 200 * p0]
    assert persisted(moderate, [400.0, 40.0, 400 * p0], "into")
    # nor anything at the reference rate
    assert not persisted(moderate, [400.0, 23.0, 400 * p0], "into")
