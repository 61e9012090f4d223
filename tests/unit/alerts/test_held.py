"""Held incidents: one the co-occurrence plan opens (split off, or a new root) is not paged
until the plan has stood behind it for ``stable_events`` events, or until it has been held
``hold_max_s`` of event time; merged away first, never. One an alarm opens pages at once."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.cooccurrence import Plan
from driftline.alerts.grouping import BookPolicy, Grouper
from driftline.alerts.model import Incident
from driftline.alerts.routing import AlertMetrics
from tests.unit.alerts.synthetic import alarm, clear, fleet, opened_apart
from tests.unit.alerts.test_replay_demo import COOCCURRENCE_DATA, EXPECTED, replay

NOW = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
PAGES = ("opened", "paged")
# Routed pages on COOCCURRENCE_DATA[0] (three problems), by batch size: 10 and 6 when every
# incident paged when opened; 9 and 6 when only incidents with unreadable roots were held.
# Holding what the plan opens until it is stable: 6 and 4 (the rest are incidents alarms
# opened, paged at once and merged later: the README's known limitation).
ALLOWANCE = {1: 3, 20: 1}


@pytest.mark.parametrize("batch", [1, 20])
def test_a_live_replay_pages_each_problem_once_and_few_transients(batch: int) -> None:
    incidents, changes = replay(batch, COOCCURRENCE_DATA[0])
    pages = [c.incident_id for c in changes if c.routed and c.action in PAGES]
    live = {i.root.slice_id: i for i in incidents.values() if i.merged_into is None}
    assert set(live) == EXPECTED
    for inc in live.values():
        assert pages.count(inc.id) == 1 and not inc.held
    assert len(pages) <= len(EXPECTED) + ALLOWANCE[batch]
    # The pager's count: routed opens and releases, not the incidents held or merged first.
    registry = CollectorRegistry()
    AlertMetrics(registry).observe(changes)
    opened = [c for c in changes if c.action == "opened"]
    assert len(opened) > len(pages)
    for name, n in (("driftline_incidents_paged_total", len(pages)),
                    ("driftline_incidents_total", len(opened))):
        assert sum(registry.get_sample_value(name, {"severity": sev}) or 0.0
                   for sev in ("warning", "major", "critical")) == n
    # A held incident merged away before it paged routed nothing at all.
    for inc in incidents.values():
        mine = [c for c in changes if c.incident_id == inc.id]
        if inc.merged_into and not any(c.routed and c.action in PAGES for c in mine):
            assert not any(c.routed for c in mine)
    # Released because the plan stood behind it (not only by the hold's time limit).
    assert any("the plan stood behind it" in (c.note or "") for c in changes
               if c.action == "paged" and c.routed)


def test_a_plan_that_never_settles_merges_or_pages_what_it_opened() -> None:
    """With a stability no root reaches, the three problems still page, each once: on
    taking over a paged incident, or after hold_max_s; nothing stays held."""
    incidents, changes = replay(20, COOCCURRENCE_DATA[0],
                                BookPolicy(stable_events=10**9, hold_max_s=600.0))
    paged = [c for c in changes if c.action == "paged"]
    assert paged and all(c.routed and ("took over" in (c.note or "")
                                       or "did not settle" in (c.note or "")) for c in paged)
    live = [i for i in incidents.values() if i.merged_into is None]
    assert {i.root.slice_id for i in live} == EXPECTED and not any(i.held for i in live)


def _held_at_600_s() -> tuple[Incident, Callable[[list[Incident]], Grouper], dict[str, Any]]:
    """An incident held (as if the plan had opened it) under a 600 s hold_max_s, a maker of
    the next batches' groupers, and the alarm that opened it."""
    ids = itertools.count(1)
    policy = BookPolicy(hold_max_s=600.0)
    summary = {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()}

    def grouper(incidents: list[Incident]) -> Grouper:
        return Grouper(incidents, summary, now=NOW, new_id=lambda: f"DL-{next(ids):06d}",
                       signatures=dict, policy=policy)

    g = grouper([])
    first = alarm("station=press-3", 1.0)
    g.apply(first)
    g.finish()
    (inc,) = g.incidents.values()
    inc.held, inc.held_since = True, inc.detected_at  # as if the plan had opened it
    return inc, grouper, first


def test_a_held_incident_pages_after_hold_max_s_of_event_time() -> None:
    """A held incident whose root the plan cannot read (no cells) pages once it has been held
    hold_max_s of event time, as it stands then."""
    inc, grouper, first = _held_at_600_s()
    g = grouper([inc])
    g.apply(clear("station=cam-1", t=first["time"] + 599.0))  # event time goes on
    g.finish()
    assert inc.held and not any(c.routed for c in g.changes)

    g = grouper([inc])
    g.apply(clear("station=cam-1", t=first["time"] + 600.0))
    g.finish()
    assert not inc.held
    (paged,) = [c for c in g.changes if c.routed]
    assert paged.action == "paged" and paged.note is not None
    assert "held 600 s" in paged.note and "did not settle within 600 s" in paged.note
    assert paged.incident["held"] is False and paged.incident["root"]["slice_id"] == \
        "station=press-3"


@pytest.mark.parametrize("order", [(300.0, 600.0, 10.0), (10.0, 600.0, 300.0)])
def test_the_hold_s_event_clock_is_the_newest_time_of_a_batch_out_of_order(
        order: tuple[float, ...]) -> None:
    """A batch holds many messages, from slices of several partitions, not in time order: the
    book's event clock is the newest time among them, not the first or last applied, nor the
    oldest. Times are after the held incident's alarm; no wall time passes."""
    inc, grouper, first = _held_at_600_s()
    g = grouper([inc])
    for k, later in enumerate(order):  # slices no incident holds: only the clock moves
        g.apply(clear(f"station=cam-{k}", t=first["time"] + later))
    g.finish()
    assert not inc.held
    (paged,) = [c for c in g.changes if c.routed]
    assert paged.action == "paged" and "held 600 s" in (paged.note or "")


def _paged_alone(*slices: str) -> tuple[Grouper, list[Incident]]:
    """An incident per slice, each opened (and paged) by its alarm in an earlier batch, and
    the Grouper of the next batch."""
    g, new_id, summary = opened_apart(*slices, now=NOW)
    incidents = sorted(g.incidents.values(), key=lambda i: i.id)
    return Grouper(incidents, summary, now=NOW, new_id=new_id, signatures=dict), incidents


def test_a_held_incident_pages_after_hold_max_s_of_wall_time_when_the_plant_is_quiet() -> None:
    """No message moves event time (the station went dark): the periodic re-attribution
    pages the incident once it has been held hold_max_s of wall time."""
    _, (inc,) = _paged_alone("station=press-3")
    inc.held, inc.held_since = True, inc.detected_at
    summary = {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()}
    for later, paged in ((599.0, False), (600.0, True)):
        g = Grouper([inc], summary, now=inc.created_at + timedelta(seconds=later),
                    new_id=lambda: "DL-000009", signatures=dict)
        g.reattribute()
        assert inc.held is not paged
        assert [c.action for c in g.changes if c.routed] == (["paged"] if paged else [])
    assert "of wall time" in (g.changes[-1].note or "")


def test_a_held_incident_due_to_page_pages_before_its_clear_resolves_it() -> None:
    """Quiet for longer than hold_max_s, then its alarm clears: on-call is paged for it, then
    told it resolved — not a silent resolution of something held past its limit."""
    _, (inc,) = _paged_alone("station=press-3")
    inc.held, inc.held_since = True, inc.detected_at
    g = Grouper([inc], {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()},
                now=NOW, new_id=lambda: "DL-000009", signatures=dict)
    g.apply(clear("station=press-3", t=inc.detected_at.timestamp() + 900.0))
    g.finish()
    assert [(c.action, c.routed) for c in g.changes] == [("paged", True),
                                                          ("auto_resolved", True)]
    assert inc.status.value == "resolved" and not inc.held


def test_a_paged_incident_taken_over_twice_in_one_batch_pages_the_last_holder() -> None:
    """Held B takes over paged P, then held A takes over B: A pages, or P's problem would sit
    unpaged in A while P's merge ends its alert."""
    g, (a, b, p) = _paged_alone("station=press-1", "station=press-2", "station=press-3")
    a.held = b.held = True
    g._merge(b, p)
    g._merge(a, b)
    g._release()
    assert not a.held and p.merged_into == b.id and b.merged_into == a.id
    (paged,) = [c for c in g.changes if c.action == "paged"]
    assert paged.incident_id == a.id and paged.routed and p.id in (paged.note or "")


def test_an_incident_opened_and_merged_in_one_batch_does_not_release_a_held_one() -> None:
    """Its own page is never routed (it lived for one batch), so it pages nothing else."""
    g, (a,) = _paged_alone("station=press-1")
    a.held = True
    g.apply(alarm("station=press-2", 1.0, cluster=1))
    (new,) = [i for i in g.incidents.values() if i.id != a.id]
    g._merge(a, new)
    g.finish()
    assert a.held and not any(c.routed for c in g.changes)


def _held_incident(policy: BookPolicy) -> tuple[Grouper, Incident]:
    """A held incident holding ``station=cam-1`` and its night cell, every root readable."""
    summary = {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()}
    g = Grouper([], summary, now=NOW, new_id=lambda: "DL-000001", signatures=dict,
                policy=policy)
    g.apply(alarm("station=cam-1", 1.0))
    g.apply(alarm("station=cam-1|shift=night", 1.0))
    (inc,) = g.incidents.values()
    assert set(inc.slices) == {"station=cam-1", "station=cam-1|shift=night"}
    inc.held = True
    g._cells = lambda ev: object()  # type: ignore[assignment,method-assign,return-value]
    return g, inc


def test_stability_counts_root_events_across_roots_the_plan_moves_within_the_incident() -> None:
    """The plan may name the station or its night cell (the same events until day shift
    comes): the count goes on from the first root named; a finish naming none restarts it."""
    g, inc = _held_incident(BookPolicy(stable_events=30))
    station, night = inc.slices["station=cam-1"], inc.slices["station=cam-1|shift=night"]

    def finish(roots: list[str], n_station: int, n_night: int) -> bool:
        station.n_since_onset, night.n_since_onset = n_station, n_night
        g._plan = Plan(roots=roots)
        return g._stable(inc)

    assert not finish(["station=cam-1"], 100, 40)
    assert not finish(["station=cam-1|shift=night"], 120, 60)  # station counted 20
    assert finish(["station=cam-1|shift=night"], 130, 69)  # station 30, night 9
    assert not finish([], 131, 70)  # no root in it: start again
    assert inc.stable_from == {}
    assert not finish(["station=cam-1|shift=night"], 140, 80)
    assert not finish(["station=cam-1|shift=night", "lot=L1"], 160, 109)
    assert finish(["station=cam-1|shift=night"], 160, 110)
    g._cells = lambda ev: None  # type: ignore[assignment,method-assign,return-value]
    assert not finish(["station=cam-1|shift=night"], 200, 200)  # unreadable: not behind it


def test_held_incidents_count_apart_from_open_ones() -> None:
    g = Grouper([], {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()}, now=NOW,
                new_id=lambda: "DL-000001", signatures=dict)
    g.apply(alarm("station=press-3", 1.0))
    g.finish()
    (inc,) = g.incidents.values()
    # An alarm opened it: it pages at once (something changed, on-call should know).
    assert not inc.held and [(c.action, c.routed) for c in g.changes] == [("opened", True)]
    inc.held = True  # as if the plan had opened it
    registry = CollectorRegistry()
    metrics = AlertMetrics(registry)
    metrics.set_open([inc])
    sev = inc.severity.value
    assert registry.get_sample_value("driftline_incidents_held", {"severity": sev}) == 1
    assert registry.get_sample_value("driftline_incidents_open",
                                     {"severity": sev, "status": "open"}) == 0
    inc.held = False
    metrics.set_open([inc])
    assert registry.get_sample_value("driftline_incidents_open",
                                     {"severity": sev, "status": "open"}) == 1


def test_a_stored_incident_without_held_loads_as_paged() -> None:
    _, (inc,) = _paged_alone("station=press-3")
    inc.held = True
    old = json.loads(inc.model_dump_json())
    del old["held"]
    assert Incident.model_validate(old).held is False
    assert Incident.model_validate_json(inc.model_dump_json()).held is True
