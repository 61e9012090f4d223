"""Episodes: counts differenced between messages, new episodes after a pause or a quiet spell."""

from __future__ import annotations

from datetime import timedelta

import pytest

from driftline.alerts.episodes import (
    add_counts,
    diff_counts,
    episode_cells,
    episode_split,
    new_episode_counts,
)
from driftline.alerts.model import EpisodeCounts, Firing, Status, utc
from tests.unit.alerts.synthetic import ONSET, alarm, counts
from tests.unit.alerts.test_grouping import active, feed, grouper


def test_counts_difference_and_sum_back() -> None:
    a, b = counts(400, 1.0), counts(1000, 0.4)
    d = diff_counts(b, a)
    assert d["n"] == 600 and sum(d["clusters"]) == 600
    assert add_counts(a, d)["clusters"] == b["clusters"]
    assert diff_counts(a, b)["n"] == 0  # buckets dropped: clipped, never negative


def _firing(n: int = 1000) -> Firing:
    t = utc(ONSET + 600.0)
    return Firing(slice_id="station=press-3", detector="ood_rate", statistic=12.0,
                  threshold=11.0, onset=utc(ONSET), first_detected=t, last_detected=t,
                  episode=EpisodeCounts(counts=counts(400, 1.0), slice_n=n))


def test_a_re_crossing_right_after_the_restart_continues_the_episode() -> None:
    msg = {**alarm("station=press-3", 1.0, kind="update", t=ONSET + 640.0), "onset_index": 2,
           "slice_n": 1010}
    assert episode_split(_firing(), msg, None, gap_events=50, gap_s=600.0) is None


def test_a_quiet_spell_before_the_re_crossing_starts_a_new_episode() -> None:
    # 100 events in 400 s after the last crossing; the statistic left zero at event 60.
    msg = {**alarm("station=press-3", 1.0, kind="update", t=ONSET + 1000.0),
           "onset_index": 60, "slice_n": 1100}
    got = episode_split(_firing(), msg, {"n": 100}, gap_events=50, gap_s=600.0)
    assert got is not None
    onset, delta = got
    assert onset == utc(ONSET + 600.0) + timedelta(seconds=240) and delta == {"n": 100}


def test_a_new_episode_of_a_slice_mixing_stations_begins_no_later_than_its_crossing() -> None:
    # A lot's events come from several stations' partitions, read in turns: this crossing's
    # event is 20 s older than the last crossing's. The interpolated onset (between the two)
    # would come after the crossing itself, and nothing could then explain the episode in time.
    msg = {**alarm("lot=L7", 1.0, kind="update", t=ONSET + 580.0), "onset_index": 60,
           "slice_n": 1100}
    got = episode_split(_firing(), msg, {"n": 100}, gap_events=50, gap_s=600.0)
    assert got is not None and got[0] == utc(ONSET + 580.0)


def test_a_re_crossing_after_a_long_pause_starts_a_new_episode() -> None:
    msg = {**alarm("station=press-3", 1.0, kind="update", t=ONSET + 4000.0),
           "onset_index": 0, "slice_n": 1020}
    got = episode_split(_firing(), msg, {"n": 20}, gap_events=50, gap_s=600.0)
    assert got is not None and utc(ONSET + 600.0) <= got[0] <= utc(ONSET + 4000.0)


def test_a_slow_slice_re_crossing_after_a_long_climb_continues_the_episode() -> None:
    """An event every 1.5 s, 3,400 s between crossings: the events kept coming, so it is one
    change, not a pause (a 9-hour change at 10 s per event became 3 incidents)."""
    msg = {**alarm("station=press-3", 1.0, kind="update", t=ONSET + 4000.0),
           "onset_index": 2, "slice_n": 1000 + 2200}
    assert episode_split(_firing(), msg, {"n": 2200}, gap_events=50, gap_s=600.0) is None


def test_a_new_episode_elsewhere_ends_the_old_firing_and_gets_its_own_evidence() -> None:
    g = grouper()
    first = alarm("station=press-3", 1.0, n=400, detector="ood_rate")
    feed(g, {**first, "slice_n": 1000})
    (old,) = active(g)
    # The slice stayed open; an hour later a different change: the same slice re-crosses
    # after a quiet spell, its counts since the first onset now hold both episodes.
    later = {**alarm("station=press-3", 1.0, n=1000, kind="update", detector="ood_rate",
                     cluster=5, t=ONSET + 4000.0), "onset_index": 300, "slice_n": 2000}
    later["evidence"]["counts"] = add_counts(first["evidence"]["counts"],
                                             counts(600, 1.0, cluster=5))
    feed(g, later)
    assert old.status is Status.resolved and old.auto_resolved
    (new,) = active(g)
    ev = new.slices["station=press-3"]
    assert ev.n_since_onset == 600 and new.evidence.clusters[0].cluster == 5
    assert new.onset is not None and new.onset > utc(ONSET + 600.0)


def test_the_open_incidents_root_re_alarming_rejoins_it() -> None:
    g = grouper()
    first = {**alarm("station=press-3", 1.0, n=400, detector="ood_rate"), "slice_n": 1000}
    feed(g, first, alarm("lot=L7", 0.25, n=1600))
    (inc,) = active(g)
    again = {**alarm("station=press-3", 1.0, n=800, kind="update", detector="ood_rate",
                     t=ONSET + 4000.0), "onset_index": 0, "slice_n": 1400}
    feed(g, again)
    assert [i.id for i in active(g)] == [inc.id]
    ev = inc.slices["station=press-3"]
    assert ev.onset == utc(ONSET) and ev.n_since_onset == 800


def test_an_onset_after_the_crossing_that_dated_it_is_the_crossing() -> None:
    # The detect stage dates an excursion by its first event; in a lot read from several
    # partitions in turns that event can be younger than the one that crossed.
    from driftline.alerts.evidence import slice_evidence

    msg = {**alarm("lot=L7", 1.0, t=ONSET + 600.0), "onset_time": ONSET + 700.0}
    ev = slice_evidence(msg)
    assert ev.onset == ev.first_time == utc(ONSET + 600.0)
    assert slice_evidence(alarm("lot=L7", 1.0, t=ONSET + 600.0)).onset == utc(ONSET)


def test_tally_counts_difference_exactly_and_ring_counts_say_they_may_not() -> None:
    """Counts with ``missed`` come from the detect stage's tally of an open alarm: cumulative
    from one start, so a difference is the events in between, complete even when the tally's
    start was truncated. Ring counts (checkpoints before tallies) drop old buckets."""
    a = {**counts(400, 1.0), "missed": 12, "truncated": True}
    b = {**add_counts(a, counts(600, 0.4)), "missed": 12, "truncated": True}
    d = diff_counts(b, a)
    assert (d["n"], d["missed"], d["truncated"]) == (600, 0, False)
    assert add_counts(a, d) == {**b, "missed": 12}
    ring = diff_counts({**counts(300, 0.4), "truncated": True}, counts(400, 1.0))
    assert ring["n"] == 0 and ring["truncated"]


def test_a_new_episode_starts_from_the_re_crossing_s_own_counts() -> None:
    since_first = counts(2000, 0.05)
    own = {**counts(40, 1.0), "missed": 3}
    msg = {"evidence": {"counts": since_first, "excursion": own}}
    assert new_episode_counts(msg, {"n": 2000}) == own
    assert new_episode_counts({"evidence": {"counts": since_first}}, {"n": 2000}) == {"n": 2000}


def test_an_episode_s_cells_are_its_own() -> None:
    start = {"watch": None, "cells": [["s1", "day", "L1", 50, 45, 0.8, 0, 0.0]],
             "overflow": [2, 1, 0.1, 0, 0.0]}
    now = {"watch": None, "cells": [["s1", "day", "L1", 50, 45, 0.8, 0, 0.0],
                                    ["s1", "day", "L2", 40, 30, 0.7, 0, 0.0]],
           "overflow": [5, 1, 0.2, 0, 0.0]}
    got = episode_cells(now, start)
    assert got["cells"] == [["s1", "day", "L2", 40, 30, 0.7, 0, 0.0]]
    assert got["overflow"] == pytest.approx([3, 0, 0.1, 0, 0.0])
    assert episode_cells(now, None) == now
