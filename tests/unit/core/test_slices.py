"""SliceDetectors and SliceCounts: alarms, lazy detectors, snapshots, merges against numpy."""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from driftline.core.baselines import DetectorBaseline
from driftline.core.counts import SliceCounts
from driftline.core.slices import EventUpdate, SliceDetectors
from driftline.core.snapshot import pack, unpack
from tests.unit.core.roundtrip import assert_slice_round_trip


class Predictions(NamedTuple):
    """What the prediction detectors judge against (a ``PredictionRates``)."""

    p: np.ndarray
    bounds: np.ndarray
    low_confidence_bound: float


K = 5
P = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
PRED = np.array([0.7, 0.3])
B = DetectorBaseline.exact(P, 0.01)  # judged against the stated rates themselves
PB = Predictions(PRED, np.stack([PRED, PRED]), 0.05)


def _events(n: int, seed: int, shift_at: int) -> list[EventUpdate]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        late = i >= shift_at
        out.append(
            EventUpdate(
                cluster=int(rng.choice(K, p=[0.1, 0.1, 0.1, 0.6, 0.1] if late else P)),
                baseline=B,
                ood=bool(rng.random() < (0.1 if late else 0.01)),
                time=1e9 + 2.0 * i,
                prediction=int(rng.random() < 0.3),
                prediction_baseline=PB,
                low_confidence=bool(rng.random() < 0.05),
                error=bool(rng.random() < 0.02) if i % 3 == 0 else None,
                expected_error=0.02,
            )
        )
    return out


def test_alarms_name_the_detector_cluster_and_onset() -> None:
    sd = SliceDetectors(arl0=1000.0)
    alarms = [sd.update(e) for e in _events(600, 0, shift_at=300)]
    assert set(sd.detectors) == {
        "cluster_mix",
        "ood_rate",
        "prediction_mix",
        "confidence",
        "error_rate",
    }
    assert not any(alarms[:300])
    first = {}
    for i, batch in enumerate(alarms):
        for a in batch:
            first.setdefault(a.detector, (i, a))
    i, mix = first["cluster_mix"]
    assert mix.rising and mix.argmax["category"] == 3 and mix.argmax["direction"] == "into"
    assert 280 <= mix.onset_index <= i and mix.onset_time == 1e9 + 2.0 * mix.onset_index
    assert "ood_rate" in first
    rising = [a.rising for batch in alarms for a in batch if a.detector == "cluster_mix"]
    assert rising[0] and not any(rising[1:])  # one rising edge per excursion above h
    assert json.loads(json.dumps(mix.as_dict()))["detector"] == "cluster_mix"
    assert sd.status()["cluster_mix"]["ratio"] >= 1.0
    assert sd.counts is not None and sd.counts.since(mix.onset_time).clusters[3] > 0


def test_optional_detectors_are_created_on_first_use() -> None:
    sd = SliceDetectors(arl0=100.0, thresholds={"ood_rate": 3.0})
    sd.update(EventUpdate(ood=True, baseline=B, time=1.0))
    assert set(sd.detectors) == {"ood_rate"}
    assert sd.detectors["ood_rate"].threshold == 3.0


def test_prediction_detectors_judge_against_their_bounds_on_either_path() -> None:
    judged = Predictions(PRED, np.stack([PRED * 0.8, PRED * 1.2]), 0.08)
    events = [EventUpdate(cluster=e.cluster, baseline=B, ood=e.ood, time=e.time,
                          prediction=e.prediction, prediction_baseline=judged,
                          low_confidence=e.low_confidence)
              for e in _events(600, 2, shift_at=300)]
    slow, fast, exact = (SliceDetectors(arl0=1000.0) for _ in range(3))
    for e in events:
        assert e.cluster is not None and e.ood is not None and e.time is not None
        assert e.prediction is not None and e.low_confidence is not None
        got = fast.observe(e.cluster, B, e.ood, e.time, e.prediction, judged, e.low_confidence)
        assert slow.update(e) == got
        exact.update(EventUpdate(cluster=e.cluster, baseline=B, ood=e.ood, time=e.time,
                                 prediction=e.prediction, prediction_baseline=PB,
                                 low_confidence=e.low_confidence))
    assert pack(slow.snapshot()) == pack(fast.snapshot())
    for name in ("prediction_mix", "confidence"):  # smaller steps: no higher statistics
        judged, stated = (d.detectors[name].snapshot()["s"] for d in (slow, exact))
        assert (judged <= stated + 1e-12).all() and (judged < stated - 1e-9).any(), name


def test_detectors_judge_against_the_bounds_and_the_counts_against_the_stated_rates() -> None:
    judged = DetectorBaseline(P, np.stack([P * 0.5, np.minimum(P * 1.6, 1.0)]), 0.01, 0.03)
    events = [EventUpdate(cluster=e.cluster, baseline=judged, ood=e.ood, time=e.time)
              for e in _events(600, 1, shift_at=300)]
    slow, fast, exact = (SliceDetectors(arl0=1000.0) for _ in range(3))
    for e in events:
        assert e.cluster is not None and e.ood is not None and e.time is not None
        got = fast.observe(e.cluster, judged, e.ood, e.time)
        assert slow.update(e) == got
        exact.update(EventUpdate(cluster=e.cluster, baseline=B, ood=e.ood, time=e.time))
    assert pack(slow.snapshot()) == pack(fast.snapshot())
    # against the bounds every member's step is no larger than against the stated rates (and
    # a CUSUM is monotone in its steps): the statistics are no higher, member by member
    for name in ("cluster_mix", "ood_rate"):
        assert (slow.detectors[name].snapshot()["s"]
                <= exact.detectors[name].snapshot()["s"] + 1e-12).all()
    assert slow.counts is not None and exact.counts is not None
    assert slow.counts.since(None) == exact.counts.since(None)  # evidence: the stated rates
    assert slow.counts.since(None).ood_expected == 600 * 0.01


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(0, 400), seed=st.integers(0, 2**16))
def test_slice_snapshot_round_trip(cut: int, seed: int) -> None:
    events = _events(400, seed, shift_at=200)
    a = SliceDetectors(arl0=500.0, bucket_seconds=60.0, max_buckets=4)
    assert_slice_round_trip(a, events, cut)


records = st.lists(
    st.tuples(st.integers(0, K - 1), st.booleans(), st.floats(0.0, 5000.0), st.booleans()),
    min_size=1,
    max_size=200,
)


@settings(max_examples=60, deadline=None)
@given(events=records, since=st.floats(-10.0, 5000.0))
def test_counts_merge_matches_numpy(
    events: list[tuple[int, bool, float, bool]], since: float
) -> None:
    width = 100.0
    a, b = SliceCounts(K, width, max_buckets=1000), SliceCounts(K, width, max_buckets=1000)
    for c, ood, t, to_a in events:
        (a if to_a else b).update(c, P, ood=ood, ood_p0=0.02, time=t)
    merged = SliceCounts.restore(unpack(pack(a.snapshot()))).merge(b)
    got = merged.since(since)
    cs = np.array([e[0] for e in events])
    oods = np.array([e[1] for e in events])
    times = np.array([e[2] for e in events])
    keep = np.floor(times / width) >= math.floor(since / width)  # whole buckets from `since`
    assert got.n == keep.sum() == got.n_ood
    assert got.clusters == np.bincount(cs[keep], minlength=K).tolist()
    np.testing.assert_allclose(got.expected, keep.sum() * P, atol=1e-9)
    assert got.ood == int(oods[keep].sum())
    assert math.isclose(got.ood_expected, 0.02 * keep.sum(), abs_tol=1e-9)
    assert merged.since(None).n == len(events) and not got.truncated


def test_counts_drop_old_buckets_and_say_so() -> None:
    c = SliceCounts(2, bucket_seconds=10.0, max_buckets=3)
    for t in range(100):
        c.update(t % 2, np.array([0.5, 0.5]), ood=None, ood_p0=None, time=float(t))
    assert c.since(70.0).n == 30 and not c.since(70.0).truncated
    old = c.since(0.0)
    assert old.truncated and old.n == 30
    assert c.since(None).n == 100


def test_restored_slices_hold_no_state_of_their_own_before_their_next_event() -> None:
    """Restored from a checkpoint, a slice's banks hold the shared placeholders a fresh bank
    starts with (its first event replaces them) and share their settings' float objects — not
    two small arrays, their tuples and a float per bank (~2 kB a slice with predictions) for as
    long as the slice stays idle; the next event goes on as the original would."""
    from driftline.core import bernoulli, mix

    a = SliceDetectors(arl0=500.0)
    events = _events(40, seed=4, shift_at=1_000)
    for e in events[:30]:
        a.update(e)
    b, c = (SliceDetectors.restore(unpack(pack(a.snapshot()))) for _ in range(2))
    for name in ("cluster_mix", "prediction_mix"):
        bank = b.detectors[name]
        assert bank._inc is mix._NO_TABLE and bank._hi == ()  # type: ignore[attr-defined]
    for name in ("ood_rate", "confidence"):
        assert b.detectors[name]._rows is bernoulli._NO_ROWS  # type: ignore[attr-defined]
    assert b.arl0 is c.arl0 and b.bucket_seconds is c.bucket_seconds
    assert all(b.detectors[n]._arl0 is c.detectors[n]._arl0  # type: ignore[attr-defined]
               for n in b.detectors)
    for e in events[30:]:
        assert a.update(e) == b.update(e)
    assert pack(a.snapshot()) == pack(b.snapshot())


def test_restored_with_the_settings_now_the_detectors_take_their_thresholds() -> None:
    """A checkpoint written at γ = 10⁴, restored with γ = 10⁹ (a tightened budget, or a share
    of it split over more detectors): every detector judges against the threshold a slice
    started now gets, with its statistics and onsets as they were; the snapshot says γ = 10⁹.
    Restored without settings, the checkpoint's stay."""
    events = _events(300, seed=2, shift_at=1_000)
    a = SliceDetectors(arl0=1e4)
    for e in events:
        a.update(e)
    fresh = SliceDetectors(arl0=1e9)
    fresh.update(events[0])
    snap = unpack(pack(a.snapshot()))
    b = SliceDetectors.restore(snap, 1e9)
    assert set(b.detectors) == set(a.detectors) == set(fresh.detectors)
    for name, det in b.detectors.items():
        assert det.threshold == fresh.detectors[name].threshold > a.detectors[name].threshold
        before, after = a.detectors[name].snapshot(), det.snapshot()
        assert after["config"]["arl0"] == 1e9
        for key in ("s", "start", "start_time", "n"):
            assert np.array_equal(before[key], after[key], equal_nan=True)
    assert b.snapshot()["arl0"] == 1e9
    kept = SliceDetectors.restore(snap)
    assert pack(kept.snapshot()) == pack(a.snapshot())


def test_restored_with_unchanged_settings_it_goes_on_bit_for_bit() -> None:
    """The same γ (the usual restart): the record it writes is the checkpoint's, byte for
    byte, and it goes on as the original."""
    events = _events(400, seed=9, shift_at=200)
    a = SliceDetectors(arl0=500.0, bucket_seconds=60.0, max_buckets=4)
    for e in events[:250]:
        a.update(e)
    b = SliceDetectors.restore(unpack(pack(a.snapshot())), 500.0)
    assert pack(b.snapshot()) == pack(a.snapshot())
    for e in events[250:]:
        assert a.update(e) == b.update(e)
    assert pack(b.snapshot()) == pack(a.snapshot())


def test_restored_with_the_settings_now_explicit_thresholds_are_those_given() -> None:
    """Explicit thresholds are part of the settings: those in the checkpoint go unless given
    again; given ones hold for their detectors, γ's for the others."""
    events = _events(50, seed=3, shift_at=1_000)
    a = SliceDetectors(arl0=1e4, thresholds={"ood_rate": 30.0})
    plain_bank = SliceDetectors(arl0=1e4)
    for e in events:
        a.update(e)
        plain_bank.update(e)
    snap = a.snapshot()
    assert SliceDetectors.restore(snap).detectors["ood_rate"].threshold == 30.0
    b = SliceDetectors.restore(snap, 1e4)
    assert b.thresholds == {}
    assert b.detectors["ood_rate"].threshold == plain_bank.detectors["ood_rate"].threshold
    c = SliceDetectors.restore(snap, 1e4, {"cluster_mix": 40.0})
    assert c.detectors["cluster_mix"].threshold == 40.0
    assert c.detectors["ood_rate"].threshold == plain_bank.detectors["ood_rate"].threshold
    assert c.snapshot()["thresholds"] == {"cluster_mix": 40.0}
