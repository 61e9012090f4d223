"""Detector mechanics: increments, simulator equivalence, onset, snapshot round trips."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driftline.core.bernoulli import (
    OOD_ALTERNATIVES,
    BernoulliCusum,
    ErrorRateCusum,
    bernoulli_table,
)
from driftline.core.cusum import CusumBank, union_threshold
from driftline.core.mix import (
    DEFAULT_EPSILONS,
    DEFAULT_FRACTIONS,
    ClusterMixCusum,
    PredictionMixCusum,
    _shared_tables,
    mix_tables,
)
from driftline.core.simulate import _Runs, bernoulli_model, mix_model, simulate
from driftline.core.snapshot import pack, plain, unpack

EPS = (0.02, 0.05, 0.1, 0.2, 0.4)
FRAC = (0.25, 0.5, 0.75, 0.95)
probs = st.lists(st.floats(0.05, 1.0), min_size=2, max_size=12).map(
    lambda w: np.asarray(w) / np.sum(w)
)


@given(p=probs)
def test_mix_increments_are_log_likelihood_ratios(p: np.ndarray) -> None:
    base, diff = mix_tables(p, EPS, FRAC)
    k = p.size
    for j, e in enumerate(EPS):
        for kk in range(k):
            q = (1 - e) * p + e * np.eye(k)[kk]
            llr = base[kk, j] + np.eye(k)[kk] * diff[kk, j]
            assert math.isclose(q.sum(), 1.0)
            np.testing.assert_allclose(llr, np.log(q / p), rtol=1e-12, atol=1e-12)
    for j, f in enumerate(FRAC, start=len(EPS)):
        for kk in range(k):
            q = p * (1 + f * p[kk] / (1 - p[kk]))
            q[kk] = (1 - f) * p[kk]
            llr = base[kk, j] + np.eye(k)[kk] * diff[kk, j]
            assert math.isclose(q.sum(), 1.0)
            np.testing.assert_allclose(llr, np.log(q / p), rtol=1e-12, atol=1e-12)


@given(p=probs, shrink=st.floats(0.0, 1.0), grow=st.floats(1.0, 3.0))
def test_bounded_mix_increments_are_least_favourable_likelihood_ratios(
    p: np.ndarray, shrink: float, grow: float
) -> None:
    # Against bounds (lower, upper), member "into k" / "out of k" is the likelihood ratio
    # against the law with p_k at upper / lower (the rest renormalised): mean exactly 1 under
    # that law, and at most 1 under any law within the bounds, e.g. p itself.
    lower, upper = p * shrink, np.minimum(p * grow, 1.0)
    base, diff = mix_tables(np.stack([lower, upper]), EPS, FRAC)
    k = p.size
    for j in range(len(EPS) + len(FRAC)):
        into = j < len(EPS)
        for kk in range(k):
            llr = base[kk, j] + np.eye(k)[kk] * diff[kk, j]
            edge = upper[kk] if into else lower[kk]
            if not 1e-9 < edge < 1 - 1e-9:
                continue
            worst = p * (1 - edge) / (1 - p[kk]) if p[kk] < 1 else np.zeros(k)
            worst[kk] = edge
            assert math.isclose(float(worst @ np.exp(llr)), 1.0, rel_tol=1e-9)
            assert float(p @ np.exp(llr)) <= 1.0 + 1e-9


def test_simulator_draws_one_law_per_run_as_it_draws_a_shared_one() -> None:
    p = np.array([0.5, 0.3, 0.2])
    model = mix_model([p], EPS, FRAC)
    h = union_threshold(200.0, model.base.size)
    shared = simulate([model], [[h]], p, n_runs=50, horizon=5_000, seed=2)[0]
    per_run = simulate([model], [[h]], np.tile(p, (50, 1)), n_runs=50, horizon=5_000,
                       seed=2)[0]
    np.testing.assert_array_equal(shared.times, per_run.times)
    with pytest.raises(ValueError, match="one row per run"):
        simulate([model], [[h]], np.tile(p, (3, 1)), n_runs=50, horizon=10, seed=2)


@given(p0=st.floats(1e-6, 0.9), rho=st.floats(1.1, 20.0), delta=st.floats(0.0, 0.3))
def test_bernoulli_increments_have_unit_mean_likelihood_ratio(
    p0: float, rho: float, delta: float
) -> None:
    t = bernoulli_table(p0, [(rho, delta)])
    p1 = min(rho * p0 + delta, (1 + p0) / 2)
    assert p0 < p1 < 1
    assert math.isclose((1 - p0) * math.exp(t[0, 0]) + p0 * math.exp(t[1, 0]), 1.0)


def _stream(probs_: np.ndarray, n: int, seed: int) -> list[int]:
    """Outcomes exactly as :func:`simulate` draws them for a single run."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs_)
    out, u = [], rng.random((512, 1))
    for t in range(n):
        if t % 512 == 0 and t:
            u = rng.random((512, 1))
        out.append(min(int(np.searchsorted(cum, u[t % 512, 0], side="right")), cum.size - 1))
    return out


def test_detector_equals_simulator_with_per_event_baselines() -> None:
    rng = np.random.default_rng(0)
    baselines = [rng.dirichlet(np.full(6, 2.0)) for _ in range(2)]
    weights = np.array([0.3, 0.7])
    joint = np.concatenate([w * p for w, p in zip(weights, baselines, strict=True)])
    det = ClusterMixCusum(6, arl0=300.0, epsilons=EPS, fractions=FRAC)
    res = simulate(
        [mix_model(baselines, EPS, FRAC)],
        [[det.threshold]],
        joint,
        n_runs=1,
        horizon=50_000,
        seed=11,
        onset=True,
    )[0]
    for t, o in enumerate(_stream(joint, 50_000, 11)):
        if det.update(o % 6, baselines[o // 6], time=1000.0 + t):
            break
    assert det.n == res.times[0, 0]
    assert det.onset_index == res.onsets[0, 0]
    assert det.onset_time == 1000.0 + res.onsets[0, 0]


def test_simulated_statistics_equal_the_detector_s_bit_for_bit() -> None:
    """Every member of every event, with the baseline changing from event to event: the
    simulator added ``base`` then ``diff`` where the bank adds their precomputed sum, and 19,990
    of 20,000 events differed (by up to 1.8e-10)."""
    rng = np.random.default_rng(0)
    baselines = [np.array([0.4, 0.3, 0.15, 0.1, 0.05]), rng.dirichlet(np.full(5, 2.0))]
    runs = _Runs(mix_model(baselines, DEFAULT_EPSILONS, DEFAULT_FRACTIONS), np.array([1e9]), 1,
                 False)
    det = ClusterMixCusum(5, arl0=1e12)
    for t in range(20_000):
        b, c = int(rng.integers(2)), int(rng.integers(5))
        runs.step(t, np.array([5 * b + c]))
        det.update(c, baselines[b])
        assert np.array_equal(runs.s.reshape(-1), det.snapshot()["s"]), t


def test_bernoulli_detector_equals_simulator() -> None:
    det = BernoulliCusum(arl0=200.0)
    res = simulate(
        [bernoulli_model(0.02, det.alternatives)],
        [[det.threshold]],
        np.array([0.98, 0.02]),
        n_runs=1,
        horizon=100_000,
        seed=3,
    )[0]
    for x in _stream(np.array([0.98, 0.02]), 100_000, 3):
        if det.update(bool(x), 0.02):
            break
    assert det.n == res.times[0, 0]


def test_same_baseline_object_fast_path_matches_fresh_copies() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.4])
    a, b = ClusterMixCusum(4), ClusterMixCusum(4)
    for c in np.random.default_rng(1).choice(4, 500, p=[0.4, 0.2, 0.2, 0.2]):
        a.update(int(c), p)
        b.update(int(c), p.copy())
    assert plain(a.snapshot()) == plain(b.snapshot())


def test_onset_is_first_event_after_last_zero() -> None:
    det = BernoulliCusum([(10.0, 0.0)], threshold=4.0)  # x=1 adds ln 10, x=0 adds ln(0.9/0.99)
    flags = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    alarms = [det.update(bool(x), 0.01, time=100.0 + i) for i, x in enumerate(flags)]
    assert alarms[-1] and not any(alarms[:-1])
    assert det.onset_index == 26 and det.onset_time == 126.0 and det.n == 28
    assert det.ratio == pytest.approx(2 * math.log(10) / 4.0)
    det.reset()
    assert (det.n, det.statistic, det.onset_index, det.alarm) == (0, 0.0, None, False)


def _feed(det: CusumBank, events: list[tuple[int, float | None]]) -> None:
    p = np.array([0.5, 0.3, 0.2])
    for c, t in events:
        if isinstance(det, ClusterMixCusum):
            det.update(c, p, time=t)
        else:
            det.update(c == 0, 0.3, time=t)


@settings(max_examples=40, deadline=None)
@given(
    cls=st.sampled_from([ClusterMixCusum, PredictionMixCusum, BernoulliCusum, ErrorRateCusum]),
    cats=st.lists(st.integers(0, 2), min_size=1, max_size=120),
    cut=st.integers(0, 120),
    timed=st.booleans(),
)
def test_snapshot_round_trip_continues_exactly(
    cls: type[CusumBank], cats: list[int], cut: int, timed: bool
) -> None:
    events = [(c, float(i) if timed else None) for i, c in enumerate(cats)]
    make = (
        (lambda: cls(3, arl0=50.0))
        if issubclass(cls, ClusterMixCusum)
        else (lambda: cls(arl0=50.0))
    )
    original = make()
    _feed(original, events[:cut])
    restored = type(original).restore(unpack(pack(original.snapshot())))
    from_json = type(original).restore(json.loads(json.dumps(plain(original.snapshot()))))
    rest = events[cut:]
    _feed(original, rest)
    _feed(restored, rest)
    _feed(from_json, rest)
    assert pack(restored.snapshot()) == pack(original.snapshot())
    assert plain(from_json.snapshot()) == plain(original.snapshot())
    for attr in ("statistic", "threshold", "alarm", "n", "argmax", "onset_index"):
        assert getattr(restored, attr) == getattr(original, attr)


def test_restore_rejects_foreign_snapshots() -> None:
    snap = BernoulliCusum().snapshot()
    with pytest.raises(ValueError):
        ClusterMixCusum.restore(snap)


def test_validation_and_helpers() -> None:
    assert union_threshold(1000.0, 10) == pytest.approx(math.log(1e4))
    with pytest.raises(ValueError):
        union_threshold(1.0, 3)
    with pytest.raises(ValueError):
        ClusterMixCusum(4, epsilons=(1.5,))
    with pytest.raises(ValueError):
        BernoulliCusum([(1.0, 0.0)])
    det = ClusterMixCusum(3)
    with pytest.raises(ValueError):
        det.update(0, np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        det.update(0, np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError):
        det.update(3, np.array([0.2, 0.3, 0.5]))
    width = len(DEFAULT_EPSILONS)
    assert det.describe_member(width) == {
        "category": 0,
        "direction": "out",
        "fraction": DEFAULT_FRACTIONS[0],
    }
    err = ErrorRateCusum(cluster_error=[0.01, 0.3], arl0=100.0)
    err.update_cluster(True, 0, time=5.0)
    assert err.argmax == {"rho": 1.0, "delta": 0.1} and err.onset_time == 5.0
    with pytest.raises(ValueError):
        ErrorRateCusum().update_cluster(True, 0)


def _plain_cusum(incs: list[np.ndarray], times: list[float]) -> list[tuple[bool, float, Any]]:
    """Page's recursion as written in the module docstring, one event at a time, with the
    onset stamped where a member leaves zero: per event (alarm, max S, onset of the max)."""
    s = np.zeros(incs[0].size)
    start = np.zeros(s.size, np.int64)
    start_t = np.full(s.size, np.nan)
    out = []
    for n, (inc, t) in enumerate(zip(incs, times, strict=True)):
        was_zero = s == 0.0
        s = np.maximum(s + inc, 0.0)
        started = was_zero & (s > 0.0)
        start[started], start_t[started] = n, t
        m = int(np.argmax(s))
        out.append((float(s.max()), (int(start[m]), float(start_t[m])) if s[m] > 0 else None))
    return out


@settings(max_examples=40, deadline=None)
@given(cats=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=300),
       threshold=st.floats(1.0, 12.0))
def test_mix_bank_bound_skips_no_alarm_and_onsets_match_the_plain_recursion(
    cats: list[tuple[int, int]], threshold: float
) -> None:
    ps = [np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.25] * 4), np.array([0.1, 0.2, 0.3, 0.4])]
    det = ClusterMixCusum(4, threshold=threshold, epsilons=EPS, fractions=FRAC)
    incs = [_shared_tables(ps[b], det.epsilons, det.fractions)[0][c] for c, b in cats]
    expected = _plain_cusum(incs, [float(i) for i in range(len(cats))])
    for i, (c, b) in enumerate(cats):
        alarm = det.update(c, ps[b], time=float(i))
        top, onset = expected[i]
        assert alarm == (top >= threshold) == det.alarm
        assert det.statistic == top
        got = None if det.onset_index is None else (det.onset_index, det.onset_time)
        assert got == onset


@settings(max_examples=40, deadline=None)
@given(flags=st.lists(st.tuples(st.booleans(), st.sampled_from([0.01, 0.05, 0.2])),
                      min_size=1, max_size=400),
       threshold=st.floats(0.5, 6.0))
def test_bernoulli_fast_path_matches_the_plain_recursion(
    flags: list[tuple[bool, float]], threshold: float
) -> None:
    det = BernoulliCusum(threshold=threshold)
    incs = [bernoulli_table(p0, det.alternatives)[int(x)] for x, p0 in flags]
    expected = _plain_cusum(incs, [float(i) for i in range(len(flags))])
    for i, (x, p0) in enumerate(flags):
        assert det.update(x, p0, time=float(i)) == (expected[i][0] >= threshold)
        assert det.statistic == expected[i][0] and det.n == i + 1
        got = None if det.onset_index is None else (det.onset_index, det.onset_time)
        assert got == expected[i][1]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_baseline_that_is_not_a_number_is_refused_naming_it(bad: float) -> None:
    """A NaN share summed to NaN, which passed the probability-vector check, and a NaN rate
    survived the clamp to [1e-9, 1 - 1e-9]: the statistic was NaN, never alarming, never
    clearing. Refused now, with the value in the message, before the bank changes."""
    mix = ClusterMixCusum(3, arl0=1e3)
    with pytest.raises(ValueError, match=f"share {bad} is not finite"):
        mix.update(0, np.array([0.5, bad, 0.5]))
    with pytest.raises(ValueError, match=f"share {bad} is not finite"):
        mix.update(0, np.array([[0.2, 0.2, 0.2], [0.5, bad, 0.5]]))
    ood = BernoulliCusum(arl0=1e3)
    with pytest.raises(ValueError, match=f"p0 = {bad} is not finite"):
        ood.update(True, bad)
    err = ErrorRateCusum(arl0=1e3)
    with pytest.raises(ValueError, match=f"p0 = {bad} is not finite"):
        err.update(False, bad)
    assert mix.n == ood.n == err.n == 0 and mix.statistic == ood.statistic == 0.0
    with pytest.raises(ValueError, match=f"p0 = {bad} is not finite"):
        bernoulli_model(bad, OOD_ALTERNATIVES)
