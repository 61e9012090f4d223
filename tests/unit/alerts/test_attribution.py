"""Root-slice attribution on synthetic alarm sets: lot, station optics, one shift's lighting."""

from __future__ import annotations

from typing import Any

from driftline.alerts.attribution import (
    Attributor,
    SliceStatus,
    compatible,
    nested,
    sibling_candidates,
)
from driftline.alerts.evidence import slice_evidence
from driftline.alerts.model import SliceEvidence, SliceRef
from tests.unit.alerts.synthetic import ONSET, STATIONS, alarm, fleet, summary_entry


def members(*msgs: dict[str, Any]) -> list[SliceEvidence]:
    return [slice_evidence(m) for m in msgs]


def attributor(summary: dict[str, dict[str, Any]] | None = None,
               baseline_n: dict[str, int] | None = None) -> Attributor:
    raw = summary if summary is not None else fleet()
    status = {sid: SliceStatus.from_summary(sid, v) for sid, v in raw.items()}
    return Attributor(status, baseline_n if baseline_n is not None else
                      {sid: st.n for sid, st in status.items()})


def ref(sid: str) -> SliceRef:
    return slice_evidence(alarm(sid, 1.0)).ref


def test_relations() -> None:
    assert nested(ref("station=press-3|shift=night"), ref("station=press-3"))
    assert nested(ref("station=press-3|shift=night"), ref("shift=night"))
    assert not nested(ref("station=press-3"), ref("lot=L7"))
    assert compatible(ref("station=press-3"), ref("lot=L7"))
    assert not compatible(ref("station=press-3"), ref("station=press-1|shift=day"))


def test_strength_is_diluted_by_the_unchanged_share() -> None:
    full = slice_evidence(alarm("station=press-3", 1.0, n=800))
    half = slice_evidence(alarm("lot=L7", 0.5, n=1600))
    quarter = slice_evidence(alarm("lot=L6", 0.25, n=3200))
    assert 0.4 < half.strength / full.strength < 0.6
    assert 0.15 < quarter.strength / full.strength < 0.35
    assert abs(full.displaced - 0.3 * 7 / 8) < 0.01


def test_lot_change_across_all_stations_is_one_incident_rooted_at_the_lot() -> None:
    # Lots L6 and L7 run side by side at every station; only L7 changed.
    alarms = members(
        alarm("lot=L7", 1.0, n=1600),
        *(alarm(f"station={s}", 0.5, n=800) for s in STATIONS),
        *(alarm(f"station={s}|shift=day", 0.5, n=800) for s in STATIONS[:2]),
        alarm("shift=day", 0.5, n=3200),
    )
    groups = attributor().partition(alarms)
    assert len(groups) == 1
    assert groups[0].root.ref.slice_id == "lot=L7"
    assert len(groups[0].related) == len(alarms) - 1


def test_lot_change_when_the_lot_is_all_that_runs_is_still_the_lot() -> None:
    # One lot at a time: stations are not diluted, but only the lot explains all four.
    alarms = members(alarm("lot=L7", 1.0, n=1600),
                     *(alarm(f"station={s}", 1.0, n=400) for s in STATIONS))
    groups = attributor().partition(alarms)
    assert [g.root.ref.slice_id for g in groups] == ["lot=L7"]


def test_one_station_optics_is_rooted_at_the_station() -> None:
    alarms = members(
        alarm("station=press-3", 1.0, n=800),
        alarm("station=press-3|shift=day", 1.0, n=400),
        alarm("station=press-3|shift=night", 1.0, n=400),
        alarm("shift=day", 0.25, n=1600), alarm("shift=night", 0.25, n=1600),
        alarm("lot=L6", 0.25, n=1600), alarm("lot=L7", 0.25, n=1600),
    )
    groups = attributor().partition(alarms)
    assert len(groups) == 1
    assert groups[0].root.ref.slice_id == "station=press-3"
    assert {r.ref.slice_id for r in groups[0].related} == {
        m.ref.slice_id for m in alarms} - {"station=press-3"}


def test_station_beats_a_lot_that_only_ran_there() -> None:
    alarms = members(alarm("station=press-3", 1.0, n=800), alarm("lot=L9", 1.0, n=800))
    groups = attributor().partition(alarms)
    assert [g.root.ref.slice_id for g in groups] == ["station=press-3"]


def test_one_shift_lighting_at_one_station_is_rooted_at_station_shift() -> None:
    summary, base = fleet(), {sid: 1000 for sid in fleet()}
    # The day shift of press-3 ran 600 clean events since the incident was first seen.
    summary["station=press-3|shift=day"] = summary_entry("station=press-3|shift=day", 1600)
    for s in STATIONS:
        if s != "press-3":
            summary[f"station={s}|shift=night"] = summary_entry(f"station={s}|shift=night", 1600)
    alarms = members(
        alarm("station=press-3|shift=night", 1.0, n=400),
        alarm("station=press-3", 1.0, n=400),  # its counts are from the night: not diluted
        alarm("shift=night", 0.25, n=1600),
        alarm("lot=L7", 0.125, n=3200),
    )
    groups = attributor(summary, base).partition(alarms)
    assert len(groups) == 1
    assert groups[0].root.ref.slice_id == "station=press-3|shift=night"


def test_shift_lighting_reroots_as_the_next_shift_shows_clean_data() -> None:
    alarms = members(alarm("station=press-3|shift=night", 1.0, n=400),
                     alarm("station=press-3", 1.0, n=400),
                     alarm("shift=night", 0.25, n=1600))
    summary, base = fleet(), {sid: 1000 for sid in fleet()}
    # Night shift: the day shift has no data since onset, the station explains its child.
    assert attributor(summary, base).choose(alarms).root.ref.slice_id == "station=press-3"
    # Day shift: press-3|day grows without alarming -> the night shift alone is the root.
    summary["station=press-3|shift=day"] = summary_entry("station=press-3|shift=day", 1500)
    g = attributor(summary, base).choose(alarms)
    assert g.root.ref.slice_id == "station=press-3|shift=night"
    assert len(g.related) == 2
    # Too few clean events, or a sibling that is itself open, prove nothing.
    summary["station=press-3|shift=day"] = summary_entry("station=press-3|shift=day", 1020)
    assert attributor(summary, base).choose(alarms).root.ref.slice_id == "station=press-3"
    summary["station=press-3|shift=day"] = summary_entry("station=press-3|shift=day", 1500,
                                                         open_=True)
    assert attributor(summary, base).choose(alarms).root.ref.slice_id == "station=press-3"


def test_a_diluted_station_gives_way_to_its_shift() -> None:
    alarms = members(alarm("station=press-3|shift=night", 1.0, n=400),
                     alarm("station=press-3", 0.5, n=800))
    g = attributor().choose(alarms)
    assert g.root.ref.slice_id == "station=press-3|shift=night"


def test_whole_night_shift_across_the_fleet_is_the_shift() -> None:
    alarms = members(alarm("shift=night", 1.0, n=1600),
                     *(alarm(f"station={s}|shift=night", 1.0, n=400) for s in STATIONS),
                     *(alarm(f"station={s}", 0.5, n=800) for s in STATIONS))
    groups = attributor().partition(alarms)
    assert [g.root.ref.slice_id for g in groups] == ["shift=night"]


def test_two_unrelated_stations_are_two_incidents_and_nothing_else() -> None:
    alarms = members(alarm("station=press-1", 1.0), alarm("station=press-1|shift=day", 1.0),
                     alarm("station=press-3", 1.0, cluster=5))
    groups = attributor().partition(alarms)
    assert sorted(g.root.ref.slice_id for g in groups) == ["station=press-1", "station=press-3"]
    assert sum(len(g.related) for g in groups) == 1


def test_sibling_candidates_are_the_multi_dimension_neighbours() -> None:
    status = {sid: SliceStatus.from_summary(sid, v) for sid, v in fleet().items()}
    got = sibling_candidates([ref("station=press-3")], status)
    assert got == {"station=press-3|shift=day", "station=press-3|shift=night"}
    got = sibling_candidates([ref("shift=night")], status)
    assert got == {f"station={s}|shift=night" for s in STATIONS}


def test_a_lot_that_ended_before_a_change_began_does_not_explain_it() -> None:
    # L7 changed and ran out at ONSET+600; press-2's day shift changes half an hour later.
    alarms = members(alarm("lot=L7", 1.0, n=1600, t=ONSET + 600.0),
                     alarm("station=press-2|shift=day", 1.0, n=300, cluster=6,
                           onset=ONSET + 1800.0, t=ONSET + 2400.0))
    groups = attributor().partition(alarms)
    assert sorted(g.root.ref.slice_id for g in groups) == [
        "lot=L7", "station=press-2|shift=day"]


def test_a_later_stronger_change_is_not_explained_by_a_diluted_running_one() -> None:
    alarms = members(alarm("lot=L7", 0.5, n=1600, t=ONSET + 3000.0),
                     alarm("station=press-2|shift=day", 1.0, n=300, cluster=6,
                           onset=ONSET + 1800.0, t=ONSET + 2400.0))
    groups = attributor().partition(alarms)
    assert len(groups) == 2


def test_a_station_does_not_explain_a_shift_slice_with_another_change() -> None:
    # press-2 gained cluster 0 all day; its night shift gained cluster 6: not the same change.
    alarms = members(alarm("station=press-2", 1.0, n=800),
                     alarm("station=press-2|shift=night", 1.0, n=300, cluster=6))
    att = attributor()
    station, night = alarms
    assert not att.explains(station, night, {"station=press-2", "station=press-2|shift=night"})
