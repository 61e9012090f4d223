"""A long-lived incident stays bounded: detectors that fire, clear and fire again for days,
and lots that come and go through its root, do not grow its stored record without end."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.book import _live_firings
from driftline.alerts.bounds import fold_ended_firings
from driftline.alerts.grouping import BookPolicy, Grouper
from driftline.alerts.model import Firing, Incident
from driftline.service.schemas.incidents import IncidentDetail
from tests.unit.alerts.synthetic import ONSET, alarm, clear, fleet, summary_entry

NOW = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
HOUR = 3600.0


class Book:
    """Batches applied as the book applies them: a fresh Grouper over the active incidents,
    each stored and loaded as JSON in between."""

    def __init__(self, policy: BookPolicy | None = None) -> None:
        self.raw = fleet()
        self.ids = itertools.count(1)
        self.policy = policy or BookPolicy()
        self.stored: dict[str, str] = {}

    def add_slice(self, sid: str) -> None:
        self.raw[sid] = summary_entry(sid, 1000)

    def feed(self, *msgs: dict[str, Any]) -> Grouper:
        summary = {k: SliceStatus.from_summary(k, v) for k, v in self.raw.items()}
        active = [Incident.model_validate_json(j) for j in self.stored.values()]
        g = Grouper([i for i in active if i.active], summary, now=NOW, signatures=dict,
                    new_id=lambda: f"DL-{next(self.ids):06d}", policy=self.policy)
        for m in msgs:
            g.apply(m)
        g.finish()
        self.stored.update({i: g.incidents[i].model_dump_json() for i in g.dirty})
        return g

    def only_active(self) -> Incident:
        (inc,) = [i for i in map(Incident.model_validate_json, self.stored.values())
                  if i.active]
        return inc


def test_a_detector_that_fires_and_clears_for_days_keeps_one_ended_firing() -> None:
    """Each episode of press-3's OOD detector (and of press-1's, related) left a firing behind:
    80 alarm/clear cycles stored 161 firings. Now the first ended one stands for the rest,
    and what dates the incident, what it names and what a resolve resets are unchanged."""
    book = Book(BookPolicy(max_timeline=50))  # the timeline has its own bound
    book.feed(alarm("station=press-3", 1.0))
    first = book.only_active()
    sizes = []
    for k in range(80):
        t = ONSET + 600 + HOUR * k  # three days and more
        for sid in ("station=press-3", "station=press-3|shift=night"):
            book.feed(alarm(sid, 1.0, detector="ood_rate", ood_shift=0.2, t=t, onset=t - 60))
            book.feed(clear(sid, detector="ood_rate", t=t + 600))
        sizes.append(len(book.only_active().model_dump_json()))
    inc = book.only_active()
    assert len(inc.detectors) == 3
    assert inc.id == first.id
    assert sorted((f.slice_id, f.detector, f.active, f.episodes) for f in inc.detectors) == [
        ("station=press-3", "cluster_mix", True, 1),
        ("station=press-3", "ood_rate", False, 80),
        ("station=press-3|shift=night", "ood_rate", False, 80)]
    ood = next(f for f in inc.detectors if f.detector == "ood_rate"
               and f.slice_id == "station=press-3")
    assert ood.first_detected.timestamp() == ONSET + 600
    assert ood.cleared_at is not None
    assert ood.cleared_at.timestamp() == ONSET + 600 + HOUR * 79 + 600
    assert (inc.detected_at, inc.onset, inc.delay) == (first.detected_at, first.onset,
                                                       first.delay)
    assert inc.summary()["detectors"] == ["cluster_mix", "ood_rate"]
    assert _live_firings(inc) == {"station=press-3": ["cluster_mix"]}
    assert sizes[-1] - sizes[30] < 8  # the record stopped growing (counts gain digits)


def test_lots_that_come_and_go_through_an_open_incident_are_dropped_oldest_first() -> None:
    """A station's change lasting days sees lot after lot alarm through it and clear; each
    stayed in the incident with its evidence, cells and exemplars (40 lots: 41 slices).
    Beyond the newest ``max_ended_slices`` (32) they are dropped and counted; the root and
    live slices stay."""
    book = Book()
    book.feed(alarm("station=press-3", 1.0))
    first = book.only_active()
    for k in range(1, 41):
        lot, t = f"lot=X{k}", ONSET + 600 + HOUR * k
        book.add_slice(lot)
        # press-3's events keep coming (1.5 s apart): its change goes on, one episode
        book.feed(alarm("station=press-3", 1.0, n=400 + 2400 * k, kind="update", t=t))
        book.feed(alarm(lot, 0.25, n=1600, t=t, onset=t - 60))
        if k < 40:  # the last lot is still running
            book.feed(clear(lot, t=t + 600))
    inc = book.only_active()
    assert len(inc.slices) == 1 + 1 + 32
    assert inc.id == first.id and inc.root.slice_id == "station=press-3"
    assert set(inc.slices) == {"station=press-3", *(f"lot=X{k}" for k in range(8, 41))}
    assert {f.slice_id for f in inc.detectors} == set(inc.slices)
    assert {r.slice_id for r in inc.related} == set(inc.slices) - {"station=press-3"}
    assert inc.dropped_slices == {"lot": 7}
    assert all(e.slice_id in inc.slices for e in inc.evidence.exemplars)
    assert (inc.detected_at, inc.onset) == (first.detected_at, first.onset)
    detail = IncidentDetail.build(inc, "http://driftline.test")
    assert detail.dropped_slices == {"lot": 7} and len(detail.firings) == 34


def test_incidents_stored_before_the_bounds_read_as_one_episode_and_nothing_dropped() -> None:
    book = Book()
    book.feed(alarm("station=press-3", 1.0))
    raw = book.only_active().model_dump(mode="json")
    del raw["dropped_slices"]
    for f in raw["detectors"]:
        del f["episodes"]
    old = Incident.model_validate(raw)
    assert old.dropped_slices == {} and [f.episodes for f in old.detectors] == [1]


def test_folding_leaves_the_firings_another_incident_shares_as_they_were() -> None:
    """A merge moves the merged-away incident's firings into the kept one, and the stored
    merged-away record still holds the same objects: folding must not change them."""
    def ended(hour: int) -> Firing:
        t = datetime(2026, 1, 5, hour, tzinfo=UTC)
        return Firing(slice_id="station=s1", detector="ood_rate", statistic=9.0, threshold=8.0,
                      first_detected=t, last_detected=t, active=False, cleared_at=t)

    shared = [ended(1), ended(2), ended(3)]
    before = [f.model_dump() for f in shared]
    (kept,) = fold_ended_firings(shared)
    assert kept.episodes == 3 and kept.last_detected == shared[2].last_detected
    assert kept.first_detected == shared[0].first_detected
    assert [f.model_dump() for f in shared] == before
