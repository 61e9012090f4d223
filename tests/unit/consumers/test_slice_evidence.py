"""An open alarm's evidence counts: exact since its onset, however long it stays open, with no
event from before the onset (``SliceState`` and its tallies; no Kafka or Redis).

The two reproductions of a statistics review are here: the counts of an alarm open longer than
the 4-h count ring were the last 4 h (and the book's differencing lost half the events), and at
detection they started at the onset's 5-min bucket, diluting the share of events moved."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from driftline.alerts.evidence import effect
from driftline.alerts.grouping import Grouper
from driftline.consumers.checkpoint import decode_record, encode_record
from driftline.consumers.slice_state import SliceState
from driftline.core.budget import DAY, Budget
from driftline.core.slices import SliceDetectors
from driftline.core.snapshot import plain
from driftline.schema import SliceUpdate
from tests.unit.consumers.fakes import FlatBaselines, one_slice_book

T0 = datetime(2026, 11, 16, 0, 0, tzinfo=UTC)
K = 8


@dataclass
class Run:
    msgs: list[dict[str, Any]]
    at: list[int]  # event index of each message
    clusters: np.ndarray
    ood: np.ndarray
    every_s: float
    state: SliceState

    def index(self, t: float) -> int:
        return round((t - T0.timestamp()) / self.every_s)

    def truth(self, first: int, last: int) -> tuple[list[int], int]:
        """Cluster counts and OOD hits of events ``first..last``."""
        return (np.bincount(self.clusters[first : last + 1], minlength=K).tolist(),
                int(self.ood[first : last + 1].sum()))


def _update(i: int, every_s: float, cluster: int, ood: bool) -> SliceUpdate:
    return SliceUpdate(
        slice_id="station=S", template="station", event_id=f"e{i}",
        ts=T0 + timedelta(seconds=i * every_s), source_partition=0, source_offset=i,
        station="S", shift="day", lot="L", baseline="station=S", cluster=cluster, distance=0.1,
        ood=ood)


def _run(seed: int, *, every_s: float, change_s: float, post: float, hours: float,
         stop_at_alarm: bool = False, autoresolve: int = 500, end_s: float = np.inf) -> Run:
    """One station at the service's default budget for its event rate: OOD 1 % → ``post``
    from ``change_s`` on, until ``end_s``."""
    rng = np.random.default_rng(seed)
    n = int(hours * 3600 / every_s)
    clusters = rng.integers(K, size=n)
    t = np.arange(n) * every_s
    ood = rng.random(n) < np.where((t >= change_s) & (t < end_s), post, 0.01)
    return _feed(clusters, ood, every_s, autoresolve, stop_at_alarm)


def _feed(clusters: np.ndarray, ood: np.ndarray, every_s: float, autoresolve: int,
          stop_at_alarm: bool = False) -> Run:
    """The events through one station's slice at the service's default budget for its rate."""
    arl0 = Budget(1.0, 30 * DAY, 200, 2, 1.0 / every_s).arl0()
    st = SliceState("station=S", "station", SliceDetectors(arl0=arl0), FlatBaselines(K),
                    autoresolve)
    msgs: list[dict[str, Any]] = []
    at: list[int] = []
    for i in range(len(clusters)):
        out = st.update(_update(i, every_s, int(clusters[i]), bool(ood[i])))
        msgs += [{**m, "slice_id": "station=S", "template": "station"} for m in out]
        at += [i] * len(out)
        if stop_at_alarm and out:
            break
    return Run(msgs, at, clusters, ood, every_s, st)


@pytest.mark.parametrize("seed", range(4))
def test_counts_at_detection_hold_no_event_from_before_the_onset(seed: int) -> None:
    """A change 4 min 50 s into a 5-min bucket: the counts at the first alarm are events from
    the onset on only, and with ``missed`` they add up to the events since the onset; every
    later message adds exactly the events in between."""
    r = _run(seed, every_s=0.5, change_s=3600 + 290, post=0.3, hours=2.0)
    first = r.msgs[0]
    assert first["kind"] == "alarm" and first["detector"] == "ood_rate"
    onset, alarm = r.index(first["onset_time"]), r.at[0]
    c = first["evidence"]["counts"]
    assert c["n"] + c["missed"] == alarm - onset + 1
    assert c["n"] >= min(8, alarm - onset + 1)  # at least the exemplars from the onset on
    clusters, hits = r.truth(onset, alarm)
    assert all(x <= y for x, y in zip(c["clusters"], clusters, strict=True))
    assert c["ood"] <= hits and not c["truncated"]
    for m, i in zip(r.msgs[1:], r.at[1:], strict=True):
        if m["kind"] == "clear":
            break
        d = m["evidence"]["counts"]
        clusters, hits = r.truth(alarm + 1, i)
        assert [x - y for x, y in zip(d["clusters"], c["clusters"], strict=True)] == clusters
        assert (d["n"] - c["n"], d["ood"] - c["ood"], d["missed"]) == (
            i - alarm, hits, c["missed"])


def test_strength_at_detection_is_the_share_that_moved() -> None:
    """OOD 1 % → 30 % (29 % of events moved), 2 events/s, the change 4 min 50 s into a bucket.
    The counts started at the onset's bucket, ~580 unchanged events before a detection ~30
    events after the onset: ``displaced`` was 0.04 on average over 20 seeds (sd 0.013). From
    the onset on it is 0.38 on average (sd 0.11 a run: detected within the onset's bucket,
    the counts are its last 8 events, the exemplars, read where the CUSUM's onset estimate
    makes them look strongest, hence above 0.29). Over 10 seeds the mean has sd ~0.036, so 0.2
    is 5 sd below the fixed value and 4 above the diluted one (sd of its mean ~0.004)."""
    vals = []
    for seed in range(10):
        r = _run(seed, every_s=0.5, change_s=3600 + 290, post=0.3, hours=2.0,
                 stop_at_alarm=True)
        vals.append(effect(r.msgs[0]["evidence"]["counts"])[2])
    assert np.mean(vals) > 0.2, np.round(vals, 3)


def _long(every_s: float = 10.0, seed: int = 0) -> Run:
    """A lens that hazes at 1 h (OOD 1 % → 30 %) and stays hazy: an alarm open 9 h."""
    return _run(seed, every_s=every_s, change_s=3600.0, post=0.3, hours=10.0)


def test_counts_since_onset_cover_an_alarm_open_longer_than_the_ring() -> None:
    """The ring holds 48 × 5 min = 4 h; the counts of the last message of a 9-h alarm were
    1,434 events of the 3,231 since the onset (``truncated``). Now every event since the
    onset is counted but the ``missed`` ones of the onset's bucket (at most a bucket's 30)."""
    r = _long()
    m, i = next((m, i) for m, i in zip(reversed(r.msgs), reversed(r.at), strict=True)
                if m["kind"] != "clear")
    c = m["evidence"]["counts"]
    onset = r.index(m["onset_time"])
    assert i - onset > 3000  # the alarm is open for 9 h, more than twice the ring
    assert c["n"] + c["missed"] == i - onset + 1 and c["missed"] <= 300 / 10
    assert not c["truncated"]
    clusters, hits = r.truth(onset, i)
    assert 0 <= hits - c["ood"] <= c["missed"]
    assert sum(clusters) - sum(c["clusters"]) == c["missed"]


def _book(r: Run) -> Grouper:
    return one_slice_book(r.state, r.msgs, T0 + timedelta(days=1))


@pytest.mark.parametrize("every_s,seed", [(e, s) for e in (10.0, 20.0, 30.0) for s in range(3)])
def test_the_book_counts_every_event_of_a_long_alarm(every_s: float, seed: int) -> None:
    """The book differences consecutive messages: with the 4-h ring it clipped the negative
    differences once old buckets dropped, and its incident held ~half the events since the
    onset (1,703 of 3,231). Now it holds them all, as rates that stay rates."""
    r = _long(every_s, seed)
    g = _book(r)
    (inc,) = g.incidents.values()
    ev = inc.slices["station=S"]
    c = ev.counts or {}
    last = max(i for m, i in zip(r.msgs, r.at, strict=True) if m["kind"] != "clear")
    assert ev.onset is not None
    since = last - r.index(ev.onset.timestamp()) + 1
    assert c["n"] + c["missed"] == since == ev.n_since_onset
    assert ev.displaced <= 1.0 and ev.strength <= 1.0 and c["ood"] <= c["n_ood"]
    assert not c["truncated"] and not inc.evidence.truncated
    assert (inc.evidence.n, inc.evidence.missed) == (c["n"], c["missed"])  # as the API serves


def test_a_new_episode_in_an_open_alarm_starts_from_its_own_onset() -> None:
    """OOD 1 % → 30 % for 10 min, 2,000 events (17 min) back at 1 %, then 30 % again: the
    alarm stays open (autoresolve 5,000) and the book starts a new episode at the second
    change. Its counts were the difference since the last message, the quiet spell included:
    2,058 events, a share moved of 0.03 at the split and 0.13 at the end of the run (true:
    0.29). Now they are the re-crossing's own, from its onset: 8 events at the split, 0.29 at
    the end."""
    every_s = 0.5
    rng = np.random.default_rng(11)
    n = 12_000
    clusters = rng.integers(K, size=n)
    t = np.arange(n) * every_s
    changed = ((t >= 3600) & (t < 4200)) | (t >= 5200)
    ood = rng.random(n) < np.where(changed, 0.3, 0.01)
    r = _feed(clusters, ood, every_s, autoresolve=5000)
    msgs, at = r.msgs, r.at
    assert "clear" not in [m["kind"] for m in msgs]  # one open alarm throughout
    g = _book(r)
    first, second = sorted(g.incidents.values(), key=lambda inc: inc.id)
    ev = second.slices["station=S"]
    assert ev.onset is not None and ev.onset.timestamp() >= T0.timestamp() + 5000
    k = next(k for k, m in enumerate(msgs) if m["time"] >= T0.timestamp() + 5200)
    took = msgs[k]["slice_n"] - msgs[k - 1]["slice_n"] - msgs[k]["onset_index"]
    c = msgs[k]["evidence"]["excursion"]
    assert c["n"] + c["missed"] == took < 200
    assert ev.displaced > 0.2 and (ev.counts or {})["n"] < 2000 + at[-1] - at[k]


def test_a_slice_read_out_of_time_order_counts_no_event_read_before_the_onset() -> None:
    """A lot on two stations reads their partitions in turns — A's next 10 min, then B's same
    10 min — so event times go back and forth. B's camera breaks (OOD 1 % → 50 %). Seeding
    the counts by event time took every bucket after the onset's, A's clean events read before
    the onset included: 508 events (missed 0) where 19 followed the onset, an OOD share of
    0.8 % against 21 %. By arrival, each message's counts and its re-crossing's
    ``excursion`` hold events since their onset only, and with ``missed`` they add up to them."""
    rng = np.random.default_rng(0)
    batch, turns = 600, 8
    reads = [("A" if t % 2 else "B", float(t)) for t in range(2000)]
    for k in range(turns):
        t0 = 2000.0 + k * batch
        reads += [("A", t0 + s) for s in range(batch)] + [("B", t0 + s) for s in range(batch)]
    clusters = rng.integers(K, size=len(reads))
    ood = np.array([rng.random() < (0.5 if st == "B" and t >= 2000 else 0.01)
                    for st, t in reads])
    state = SliceState("lot=L", "lot", SliceDetectors(arl0=1e6), FlatBaselines(K), 5000)
    last: dict[str, int] = {}
    onset: dict[str, int] = {}
    checked: list[str] = []
    for i, (station, t) in enumerate(reads):
        upd = SliceUpdate(
            slice_id="lot=L", template="lot", event_id=f"e{i}", ts=T0 + timedelta(seconds=t),
            source_partition=station == "B", source_offset=i, station=station, shift="day",
            lot="L", baseline="station=S", cluster=int(clusters[i]), distance=0.1,
            ood=bool(ood[i]))
        for m in state.update(upd):
            name = m["detector"]
            if m["kind"] == "clear" or name not in ("ood_rate", "cluster_mix"):
                continue
            took = m["slice_n"] - last.get(name, 0) - m["onset_index"]  # since the last reset
            last[name] = m["slice_n"]
            parts = [("excursion", took)] if m["kind"] == "update" else []
            if m["kind"] == "alarm":
                onset[name] = i - took + 1
            parts.append(("counts", i - onset[name] + 1))
            for part, since in parts:
                c = m["evidence"][part]
                truth = np.bincount(clusters[i - since + 1 : i + 1], minlength=K)
                assert c["n"] + c["missed"] == since, (part, c["n"], c["missed"], since)
                assert all(x <= y for x, y in zip(c["clusters"], truth, strict=True))
                assert c["ood"] <= ood[i - since + 1 : i + 1].sum()
                checked.append(part)
    assert "excursion" in checked and checked.count("counts") >= 3, checked


def test_a_tally_lives_with_its_alarm() -> None:
    """Started at the alarm, dropped at its clear (the next alarm starts afresh), and with
    every open alarm when on-call resets the slice or another reference restarts it."""
    r = _run(0, every_s=0.5, change_s=3600.0, end_s=4000.0, post=0.3, hours=1.5)
    assert [m["kind"] for m in r.msgs if m["kind"] != "update"] == ["alarm", "clear"]
    counts = r.state.det.counts
    assert counts is not None and counts.tallies == () and not r.state.open
    st = _run(0, every_s=0.5, change_s=3600.0, post=0.3, hours=1.2).state
    assert st.det.counts is not None and st.det.counts.tallies == tuple(st.open) != ()
    st.reset()
    assert st.det.counts.tallies == ()
    st = _run(0, every_s=0.5, change_s=3600.0, post=0.3, hours=1.2).state
    st.baselines = FlatBaselines(K, reference_id="other")
    out = st.update(_update(10**6, 0.5, 1, False))
    assert {m["kind"] for m in out} == {"clear"}
    assert st.det.counts is not None and st.det.counts.tallies == ()


def test_an_open_alarm_s_counts_survive_a_checkpoint_and_older_ones_fall_back_to_the_ring(
) -> None:
    """Restored mid-alarm from its checkpoint record, a slice reports what it would have
    without the restart; a record written before tallies restores with the ring's counts."""
    every_s, n = 0.5, 9000
    rng = np.random.default_rng(5)
    clusters = rng.integers(K, size=n)
    ood = rng.random(n) < np.where(np.arange(n) >= 7200, 0.3, 0.01)
    ups = [_update(i, every_s, int(clusters[i]), bool(ood[i])) for i in range(n)]

    def fresh() -> SliceState:
        return SliceState("station=S", "station", SliceDetectors(arl0=1e6), FlatBaselines(K), 10**6)

    whole, cut = fresh(), fresh()
    want = [m for u in ups for m in whole.update(u)]
    got = [m for u in ups[:8000] for m in cut.update(u)]
    assert cut.open and cut.det.counts is not None and cut.det.counts.tallies
    record = decode_record(encode_record({"state": cut.snapshot(), "applied": {}}))
    restored = SliceState.restore(record["state"], FlatBaselines(K), 10**6)
    assert plain(restored.snapshot()) == plain(cut.snapshot())
    got += [m for u in ups[8000:] for m in restored.update(u)]
    assert plain(got) == plain(want)

    old = plain(cut.snapshot())
    del old["detectors"]["counts"]["tallies"]
    legacy = SliceState.restore(old, FlatBaselines(K), 10**6)
    (name,) = legacy.open
    ring = legacy.det.counts.since(legacy.open[name]["onset_time"])  # type: ignore[union-attr]
    c = legacy.evidence(legacy.open[name]["onset_time"], name)["counts"]
    assert (c["n"], c["ood"]) == (ring.n, ring.ood) and "missed" not in c
