"""Attribution on real pipeline output: the outbox the demo's detect stage wrote.

``data/demo_outbox.json.gz`` holds the alarms of ``driftline demo --size small`` (four stations,
three shifts, rotating lots; a bad supplier lot at every station, darker night lighting at
cam-2 on both nights, surf-1's lens hazing on day two) and the final slice summary. The slices
stay open across episodes there, lots are new slices that never clear, and every change is
mostly OOD: replayed in batches of any size, the book must find exactly the three problems.

``data/demo_outbox_small_baselines.json.gz`` is a later run whose detectors judge each
station×shift cell against the bounds its 120 reference samples allow (a run that opened a
false incident before the book placed alarms roots first): no cell's statistic climbs on clean
data any more, so the haze's cells and the second night's lots cross together as the night
begins, and the lots, read mostly from the two changed stations so far, explain by strength
the alarms of both changes.

``data/demo_outbox_cooccurrence_{1,2}.json.gz`` are two runs with the co-occurrence attribution:
surf-1's OOD alarm stays open from the lot (evening, day one) to the haze (day two) and its
detector sits at zero in between, so one alarm holds two episodes of two changes; its cells,
since the alarm was raised, still show the lot's when the haze begins. The haze's incident
must begin with the haze, not with the lot's episode of its root.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from driftline.alerts.changes import Change
from driftline.alerts.grouping import BookPolicy
from driftline.alerts.model import Incident
from driftline.demo.plant import Plant, PlantConfig
from driftline.demo.replay import load_dump, replay_batches

DATA = Path(__file__).parent / "data" / "demo_outbox.json.gz"
BOUNDS_DATA = Path(__file__).parent / "data" / "demo_outbox_small_baselines.json.gz"
COOCCURRENCE_DATA = [Path(__file__).parent / "data" / f"demo_outbox_cooccurrence_{k}.json.gz"
                     for k in (1, 2)]
SMALL = PlantConfig(shift_events=120, lot_events=60, stream_days=2)  # `demo --size small`
EXPECTED = {"lot=L2609", "station=cam-2|shift=night", "station=surf-1"}


def replay(batch: int, data_file: Path = DATA, policy: BookPolicy | None = None
           ) -> tuple[dict[str, Incident], list[Change]]:
    """The incidents at the end of the dump's replay, and every change on the way."""
    changes: list[Change] = []
    incidents: dict[str, Incident] = {}
    for g, _ in replay_batches(*load_dump(data_file), batch, policy):
        changes += g.changes
        incidents = g.incidents
    return incidents, changes


@pytest.mark.parametrize("batch", [1, 7, 50, 500])
def test_the_three_injected_problems_and_nothing_else(batch: int) -> None:
    incidents, _ = replay(batch)
    live = [i for i in incidents.values() if i.merged_into is None]
    assert sorted(i.root.slice_id for i in live) == sorted(EXPECTED)
    by_root = {i.root.slice_id: i for i in live}
    lot = {r.slice_id for r in by_root["lot=L2609"].related}
    assert {f"station={s}" for s in ("cam-1", "cam-2", "surf-1", "surf-2")} <= lot
    night = {r.slice_id for r in by_root["station=cam-2|shift=night"].related}
    assert "shift=night" in night and "lot=L2611" in night
    haze = {r.slice_id for r in by_root["station=surf-1"].related}
    assert "station=surf-1|shift=day" in haze
    # The lot ran for eight minutes: the onset is its start, not an earlier or later slice's.
    # Its start as the dump holds it (it keeps no events): the lot slice's alarm dates the
    # change from its event onset_index (0-based: 1, the slice's second event, the first that
    # looked out of distribution). That comes after the plant starts the lot (06:32:00) and
    # within two periods here: from then on each station, a second after the other, draws
    # the lot at each of its events with probability 1/2.
    messages, _ = load_dump(DATA)
    (lot_alarm,) = [m for m in messages if m["slice_id"] == "lot=L2609" and m["kind"] == "alarm"]
    start = datetime.fromtimestamp(lot_alarm["onset_time"], UTC)
    (injected,) = [j for j in Plant({}, SMALL).injections if j.name == "lot"]
    assert injected.start <= start <= injected.start + timedelta(seconds=2 * SMALL.period_s)
    # No tolerance: the book copies the root's onset (it dates nothing itself), event times
    # are whole seconds, and slices of the lot's incident hold onsets one second or more
    # before or after it (surf-1|evening 06:32:06, cam-1 06:32:04, surf-2 06:32:03, surf-1
    # 06:30:50): a tolerance of a second would accept theirs.
    assert by_root["lot=L2609"].onset == start


@pytest.mark.parametrize("batch", [1, 3, 7, 20, 50])
def test_the_three_problems_when_cells_are_judged_against_their_bounds(batch: int) -> None:
    # The book runs a batch per checkpoint (a few messages); the whole outbox in one or two
    # batches, against the final summary, is not met here (a shift=evening root: every slice
    # is placed before any incident is attributed).
    incidents, _ = replay(batch, BOUNDS_DATA)
    live = [i for i in incidents.values() if i.merged_into is None]
    assert sorted(i.root.slice_id for i in live) == sorted(EXPECTED)
    by_root = {i.root.slice_id: i for i in live}
    haze = {r.slice_id for r in by_root["station=surf-1"].related}
    assert {"station=surf-1|shift=day", "station=surf-1|shift=night"} <= haze
    night = {r.slice_id for r in by_root["station=cam-2|shift=night"].related}
    assert "lot=L2617" in night


@pytest.mark.parametrize("batch", [1, 5, 50])
@pytest.mark.parametrize("data_file", COOCCURRENCE_DATA, ids=lambda p: p.name.split(".")[0])
def test_each_incident_begins_when_its_change_did(data_file: Path, batch: int) -> None:
    incidents, _ = replay(batch, data_file)
    live = [i for i in incidents.values() if i.merged_into is None]
    assert sorted(i.root.slice_id for i in live) == sorted(EXPECTED)
    by_root = {i.root.slice_id: i for i in live}
    for inj in Plant({}, SMALL).injections:
        inc = by_root["|".join(f"{k}={v}" for k, v in inj.root.items())]
        assert inc.onset is not None
        assert abs((inc.onset - inj.start).total_seconds()) <= 120, inj.name
    # surf-1's episode of the lot stays with the lot; its haze episode is the haze's root
    assert "station=surf-1" in by_root["lot=L2609"].slices
    haze = by_root["station=surf-1"]
    assert haze.slices["station=surf-1"].onset == haze.onset
