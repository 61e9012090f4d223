"""Alarms → incidents without Redis: grouping in any order, re-rooting, merging, auto-resolve."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.changes import record_change
from driftline.alerts.evidence import ClusterCatalog
from driftline.alerts.grouping import Grouper, pending_key
from driftline.alerts.model import Incident, Status
from tests.unit.alerts.synthetic import ONSET, STATIONS, alarm, clear, fleet, summary_entry

NOW = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


def grouper(incidents: list[Incident] | None = None,
            summary: dict[str, dict[str, Any]] | None = None,
            signatures: dict[str, dict[str, Any]] | None = None) -> Grouper:
    ids = itertools.count(1 + len(incidents or []))
    raw = summary if summary is not None else fleet()
    return Grouper(incidents or [], {k: SliceStatus.from_summary(k, v) for k, v in raw.items()},
                   now=NOW, new_id=lambda: f"DL-{next(ids):06d}",
                   signatures=lambda: signatures or {})


def feed(g: Grouper, *msgs: dict[str, Any]) -> None:
    for m in msgs:
        g.apply(m)
    g.finish()


def active(g: Grouper) -> list[Incident]:
    return [i for i in g.incidents.values() if i.active]


LOT_ALARMS = [alarm("lot=L7", 1.0, n=1600),
              *(alarm(f"station={s}", 0.5, n=800) for s in STATIONS),
              alarm("shift=day", 0.5, n=3200)]


@pytest.mark.parametrize("seed", range(6))
def test_lot_alarms_in_any_order_make_one_incident_rooted_at_the_lot(seed: int) -> None:
    msgs = list(LOT_ALARMS)
    random.Random(seed).shuffle(msgs)
    g = grouper()
    if seed % 2:  # one message per batch, or the whole stream in one batch
        for m in msgs:
            feed(g, m)
    else:
        feed(g, *msgs)
    live = active(g)
    assert len(live) == 1
    assert live[0].root.slice_id == "lot=L7"
    assert len(live[0].related) == 5
    merged = [i for i in g.incidents.values() if i.merged_into]
    assert all(i.merged_into == live[0].id and i.status is Status.resolved for i in merged)
    assert {c.action for c in g.changes} <= {"opened", "related_added", "rerooted", "merged",
                                             "escalated"}
    if seed % 2 == 0:  # incidents opened and merged within one batch are never routed
        assert [c.incident_id for c in g.changes if c.routed and c.action == "opened"] == [
            live[0].id]


def test_station_optics_opens_one_incident_and_updates_do_not_add_more() -> None:
    g = grouper()
    for m in [alarm("station=press-3|shift=night", 1.0), alarm("station=press-3", 1.0),
              alarm("lot=L7", 0.25, n=1600), alarm("shift=night", 0.25, n=1600),
              alarm("station=press-3", 1.0, kind="update", t=1_700_001_000.0)]:
        feed(g, m)
    (inc,) = active(g)
    assert inc.root.slice_id == "station=press-3"
    root_firing = next(f for f in inc.detectors if f.slice_id == "station=press-3")
    assert root_firing.crossings == 2
    assert inc.delay.seconds == 600.0 and inc.delay.events == 400
    assert inc.evidence.clusters[0].cluster == 0 and inc.evidence.clusters[0].delta > 0.2
    # Changed exemplars (cluster 0 gained mass) come first.
    assert inc.evidence.exemplars[0].cluster == 0


def test_shift_lighting_reroots_when_the_day_shift_is_clean() -> None:
    summary = fleet()
    g = grouper(summary=summary)
    for m in [alarm("station=press-3|shift=night", 1.0), alarm("station=press-3", 1.0),
              alarm("shift=night", 0.25, n=1600)]:
        feed(g, m)
    (inc,) = active(g)
    assert inc.root.slice_id == "station=press-3"
    # The day shift runs: the summary shows its clean events; re-attribution moves the root.
    summary["station=press-3|shift=day"] = summary_entry("station=press-3|shift=day", 1500)
    g2 = grouper([inc], summary)
    g2.reattribute()
    (inc,) = active(g2)
    assert inc.root.slice_id == "station=press-3|shift=night"
    assert [c.action for c in g2.changes] == ["rerooted"]
    assert inc.timeline[-1].action == "rerooted" and inc.timeline[-1].who == "driftline"


def test_unrelated_stations_are_separate_incidents() -> None:
    g = grouper()
    feed(g, alarm("station=press-1", 1.0))
    feed(g, alarm("station=press-3", 1.0, cluster=5))
    assert sorted(i.root.slice_id for i in active(g)) == ["station=press-1", "station=press-3"]


def test_clear_of_every_detector_auto_resolves() -> None:
    g = grouper()
    feed(g, alarm("station=press-3", 1.0))
    feed(g, alarm("station=press-3", 1.0, detector="ood_rate", ood_shift=0.2))
    feed(g, alarm("lot=L7", 0.25, n=1600))
    feed(g, clear("station=press-3"))
    feed(g, clear("station=press-3", detector="ood_rate"))
    (inc,) = active(g)
    feed(g, clear("lot=L7"))
    assert not active(g)
    assert inc.status is Status.resolved and inc.auto_resolved
    assert [c.action for c in g.changes][-1] == "auto_resolved"


def test_an_incident_cleared_by_a_reference_switch_does_not_read_as_ended() -> None:
    """Workers restarted on a new reference clear the alarms of the old one; the incident
    resolves, but its timeline says why — not that its detectors went back to no drift."""
    g = grouper()
    feed(g, alarm("station=press-3", 1.0))
    feed(g, {**clear("station=press-3"), "reason": "reference_changed", "reference_id": "B1"})
    (inc,) = g.incidents.values()
    assert inc.status is Status.resolved and inc.auto_resolved
    note = inc.timeline[-1].note or ""
    assert "reference B1" in note and "no-drift" not in note, note


def test_an_incident_keeps_its_cluster_descriptions_after_a_reference_switch() -> None:
    """The book restarted on the new reference refreshes an old incident when the switch
    clears its alarms: its evidence stays on the old reference's clusters and keeps saying
    what they are, and names that reference."""
    catalog_a = ClusterCatalog({0: {"id": 0, "exemplars": ["ref-e1"], "lift": []}},
                               frozenset({0}), "A")
    ids = itertools.count(1)
    g = Grouper([], {k: SliceStatus.from_summary(k, v) for k, v in fleet().items()}, now=NOW,
                new_id=lambda: f"DL-{next(ids):06d}", signatures=dict, catalog=catalog_a)
    feed(g, {**alarm("station=press-3", 1.0), "reference_id": "A"})
    (inc,) = active(g)
    before = {c.cluster: c.description for c in inc.evidence.clusters}
    aggressors = {c.cluster for c in inc.evidence.clusters if c.aggressor}
    assert before[0] is not None and aggressors == {0} and inc.evidence.reference_id == "A"
    g2 = Grouper([inc], {}, now=NOW, new_id=lambda: "DL-000099", signatures=dict,
                 catalog=ClusterCatalog({0: {"id": 0, "exemplars": ["other"]}}, frozenset(), "B"))
    feed(g2, {**clear("station=press-3"), "reason": "reference_changed", "reference_id": "B"})
    after = g2.incidents[inc.id].evidence
    assert {c.cluster: c.description for c in after.clusters} == before
    assert {c.cluster for c in after.clusters if c.aggressor} == aggressors
    assert after.reference_id == "A"


def test_recurrence_links_a_matching_resolved_incident() -> None:
    g = grouper()
    feed(g, alarm("station=press-3", 1.0))
    past = active(g)[0]
    sigs = {"DL-000077": {"template": "station", "signature": past.evidence.signature},
            "DL-000078": {"template": "station",
                          "signature": grouper_signature(cluster=5)},
            "DL-000079": {"template": "lot", "signature": past.evidence.signature}}
    g2 = grouper(signatures=sigs)
    feed(g2, alarm("station=press-3", 1.0, eps=0.25))
    (inc,) = active(g2)
    assert [r.incident_id for r in inc.recurrence] == ["DL-000077"]
    assert inc.recurrence[0].similarity > 0.99


def test_recurrence_does_not_match_a_signature_of_another_reference() -> None:
    """After a model upgrade the new reference numbers other clusters (as many of them): a
    past incident's signature on the old reference is not compared with a new one's."""
    g = grouper()
    feed(g, {**alarm("station=press-3", 1.0), "reference_id": "A"})
    past = active(g)[0].evidence.signature
    sigs = {"DL-000077": {"template": "station", "signature": past, "reference_id": "A"},
            "DL-000078": {"template": "station", "signature": past, "reference_id": "B"},
            "DL-000079": {"template": "station", "signature": past}}  # stored before the field
    g2 = grouper(signatures=sigs)
    feed(g2, {**alarm("station=press-3", 1.0, eps=0.25), "reference_id": "A"})
    (inc,) = active(g2)
    assert sorted(r.incident_id for r in inc.recurrence) == ["DL-000077", "DL-000079"]


def grouper_signature(cluster: int) -> list[float]:
    g = grouper()
    feed(g, alarm("station=press-1", 1.0, cluster=cluster))
    return active(g)[0].evidence.signature


def test_updates_after_an_on_call_resolve_wait_for_the_reset() -> None:
    g = Grouper([], {}, now=NOW, new_id=lambda: "DL-000001", signatures=dict,
                reset_pending=["station=press-3"])
    feed(g, alarm("station=press-3", 1.0, kind="update"))
    assert not g.incidents
    feed(g, alarm("station=press-3", 1.0, kind="alarm"))
    assert len(g.incidents) == 1 and g.reset_done == {"station=press-3"}


def test_a_later_change_does_not_join_an_incident_whose_changes_ended_before_it() -> None:
    # A lot ran through every station's day shift and out (the demo's bad lot); twenty minutes
    # later press-3's optics go (a new episode of press-3's OOD detector, weak so far). The
    # lot's day cells had events since (the summary says so), but their change was last seen
    # when the lot ran out: the optics are a new incident, not more of the lot's.
    ood = {"detector": "ood_rate", "eps": 0.0, "ood_shift": 0.8}
    raw = fleet()
    g = grouper(summary=raw)
    feed(g, alarm("lot=L7", 1.0, n=1600, t=ONSET + 300, **ood),
         *(alarm(f"station={s}|shift=day", 0.5, t=ONSET + 320, **ood) for s in STATIONS),
         *(alarm(f"station={s}", 0.5, t=ONSET + 320, **ood) for s in STATIONS))
    (lot,) = active(g)
    for sid in raw:
        if sid != "lot=L7":
            raw[sid]["last_time"] = ONSET + 3000
    g = grouper(active(g), summary=raw)
    optics = alarm("station=press-3", 0.3, n=1100, kind="update", t=ONSET + 2000, **ood)
    optics["onset_index"] = 200  # sat at zero for 200 events before climbing: a new episode
    feed(g, optics)
    (new,) = (i for i in active(g) if i.id != lot.id)
    assert new.root.slice_id == "station=press-3" and new.onset is not None
    assert new.onset.timestamp() > ONSET + 1000
    assert lot.root.slice_id == "lot=L7" and lot.slices["station=press-3"].onset == \
        lot.onset  # the lot's own episode of press-3, unchanged


def test_a_cell_joins_the_incident_whose_root_explains_it_not_a_lot_s_in_another() -> None:
    # press-1's optics since the day shift, press-2's night lighting; the night begins at both,
    # and a lot running there has read mostly their changed events so far (its other stations'
    # partitions lag): it joins press-2's incident, whose root explains it. press-1's night cell
    # then alarms too: the lot explains it by strength, but press-1's root is the explanation
    # attribution keeps; joined through the lot it stayed an incident of its own (the demo's
    # false incident rooted at surf-1's night cell).
    ood = {"detector": "ood_rate", "eps": 0.0}
    raw = fleet()
    for entry in raw.values():
        entry["last_time"] = ONSET + 4000
    g = grouper(summary=raw)
    night = ONSET + 3000
    feed(g, alarm("station=press-1|shift=day", 1.0, t=ONSET + 300, ood_shift=0.65, **ood),
         alarm("station=press-1", 1.0, t=ONSET + 320, ood_shift=0.65, **ood))
    feed(g, alarm("station=press-1", 1.0, n=900, t=night + 20, kind="update", ood_shift=0.65,
                  **ood))  # the optics persist: re-crossing
    feed(g, alarm("station=press-2|shift=night", 1.0, t=night + 30, onset=ONSET + 100,
                  ood_shift=0.98, **ood))
    feed(g, alarm("lot=L7", 1.0, n=120, t=night + 40, onset=night, ood_shift=0.97, **ood))
    feed(g, alarm("station=press-1|shift=night", 1.0, n=110, t=night + 50, onset=night,
                  ood_shift=0.97, **ood))
    roots = {i.root.slice_id: sorted(i.slices) for i in active(g)}
    assert roots == {
        "station=press-1": ["station=press-1", "station=press-1|shift=day",
                            "station=press-1|shift=night"],
        "station=press-2|shift=night": ["lot=L7", "station=press-2|shift=night"]}


def test_two_detectors_of_one_slice_are_not_counted_twice() -> None:
    # OOD rate alarms first, the cluster mix later, each from its own tally since its own
    # onset: both in one incident, the slice's evidence is one detector's events, not the sum.
    g = grouper()
    feed(g, alarm("lot=L7", 1.0, n=400, detector="ood_rate", ood_shift=0.5))
    feed(g, alarm("lot=L7", 1.0, n=300, t=ONSET + 900, onset=ONSET + 300))
    (inc,) = active(g)
    assert len(inc.detectors) == 2
    assert inc.slices["lot=L7"].n_since_onset <= 400


def test_an_incident_merged_just_after_it_auto_resolved_passes_on_its_acknowledgement() -> None:
    # A slice's next episode joins another incident and leaves its first one without a live
    # firing: that one auto-resolves, then is merged into the live one (Grouper._alarm). Its
    # status is no longer "acknowledged" by then; on-call's acknowledgement must still carry.
    g = grouper()
    feed(g, alarm("station=press-1", 1.0, n=400), alarm("station=press-2", 1.0, n=400, cluster=3))
    a, b = sorted(active(g), key=lambda i: i.id)
    a.status = Status.acknowledged
    record_change(a, "acknowledged", who="alice", at=NOW, note="on it")
    g = grouper([a, b])
    gone, keep = g.incidents[a.id], g.incidents[b.id]
    g._end_firing(gone, gone.detectors[0], "new episode")
    assert gone.status is Status.resolved and gone.auto_resolved
    g._merge(keep, gone)
    assert keep.status is Status.acknowledged
    assert [(e.who, e.action) for e in keep.timeline if e.who == "alice"] == [
        ("alice", "acknowledged")]


def test_a_long_timeline_drops_the_service_s_entries_before_on_call_s() -> None:
    g = grouper()
    feed(g, alarm("station=press-1", 1.0, n=400))
    (inc,) = active(g)
    record_change(inc, "acknowledged", who="alice", at=NOW, note="on it", max_timeline=50)
    record_change(inc, "annotated", who="bob", at=NOW, note="lens?", max_timeline=50)
    for k in range(200):
        record_change(inc, "related_added", who="driftline", at=NOW, note=str(k),
                      max_timeline=50)
    assert len(inc.timeline) == 50
    assert inc.timeline[0].action == "opened"
    assert [e.who for e in inc.timeline[1:3]] == ["alice", "bob"]
    assert inc.timeline[-1].note == "199"  # the newest system entries stay
    for k in range(60):  # on-call alone over the limit: its oldest entries go
        record_change(inc, "annotated", who="carol", at=NOW, note=f"c{k}", max_timeline=50)
    assert len(inc.timeline) == 50 and inc.timeline[0].action == "opened"
    assert [e.note for e in inc.timeline[1:]] == [f"c{k}" for k in range(11, 60)]
    record_change(inc, "auto_resolved", who="driftline", at=NOW, max_timeline=50)
    assert inc.timeline[-1].action == "auto_resolved"  # what just happened is never dropped
    assert len(inc.timeline) == 50 and inc.timeline[1].note == "c12"



def test_a_reset_detector_s_re_crossings_stay_with_the_resolved_incident() -> None:
    """Until the detect stage resets the detector on-call's resolve named, its re-crossings
    are the resolved incident's, even where another live incident holds the slice; its next
    alarm is news."""
    g = grouper()
    feed(g, alarm("station=press-1", 1.0, n=400))
    (other,) = active(g)
    g = Grouper([other], g.summary, now=NOW, new_id=lambda: "DL-000009",
                signatures=lambda: {}, reset_pending=[pending_key("station=press-1",
                                                                  "ood_rate")])
    feed(g, alarm("station=press-1", 1.0, n=400, kind="update", detector="ood_rate",
                  eps=0.0, ood_shift=0.8))
    assert [f.detector for f in g.incidents[other.id].detectors] == ["cluster_mix"]
    assert g.reset_done == set()
    feed(g, alarm("station=press-1", 1.0, n=400, detector="ood_rate", eps=0.0,
                  ood_shift=0.8, t=ONSET + 5000))
    assert g.reset_done == {pending_key("station=press-1", "ood_rate")}
    assert "ood_rate" in {f.detector for i in active(g) for f in i.detectors}
