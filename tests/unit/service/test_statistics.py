"""The statistics behind /gap and /versions, and the slice timeline's replay, against
references: brute force, scipy, and the detectors themselves."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from driftline.core.bernoulli import BernoulliCusum
from driftline.core.counts import SliceCounts
from driftline.core.mix import ClusterMixCusum
from driftline.service.statistics import holm, js_matrix, location_test, mix_test, rate_test
from driftline.service.timeline import buckets, replay, window


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_matches_its_definition(p: list[float]) -> None:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    for rank, i in enumerate(order):
        expected = max(min(1.0, (m - r) * p[order[r]]) for r in range(rank + 1))
        assert abs(holm(p)[i] - expected) < 1e-9
    assert all(a >= b for a, b in zip(holm(p), p, strict=True))


def test_js_matrix_is_a_symmetric_bounded_divergence() -> None:
    rng = np.random.default_rng(0)
    mixes = [rng.dirichlet(np.ones(6)) for _ in range(4)]
    m = js_matrix(mixes)
    for i, j in itertools.product(range(4), repeat=2):
        assert m[i][j] == m[j][i] and 0 <= m[i][j] <= 1
        assert abs(m[i][j] - jensenshannon(mixes[i], mixes[j], base=2) ** 2) < 1e-6
    assert js_matrix([np.array([1.0, 0.0]), np.array([0.0, 1.0])])[0][1] == 1.0


def test_tests_detect_what_they_should_and_decline_what_they_cannot() -> None:
    assert mix_test([50, 50], [90, 10]).p_value < 1e-6  # type: ignore[union-attr]
    assert mix_test([30, 30, 40], [30, 30, 40]).p_value > 0.99  # type: ignore[union-attr]
    assert mix_test([10, 0], [5, 0]) is None  # one category used: nothing to compare
    assert rate_test(5, 100, 40, 100).p_value < 1e-6  # type: ignore[union-attr]
    assert rate_test(1, 0, 1, 10) is None
    rng = np.random.default_rng(1)
    assert location_test(list(rng.normal(0.8, 0.05, 60)),
                         list(rng.normal(0.7, 0.05, 60))).p_value < 1e-6  # type: ignore[union-attr]
    assert location_test([0.5] * 10, [0.5] * 10) is None


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(0.0, 0.6))
def test_replay_with_one_event_per_bucket_is_the_detectors_own_trajectory(
        seed: int, shift: float) -> None:
    """With one event per bucket the bucket-level Page recursion is the per-event one: the
    replayed statistic must equal the real cluster-mix and OOD CUSUMs event by event."""
    rng = np.random.default_rng(seed)
    k, n = 5, 120
    p = rng.dirichlet(np.ones(k) * 3)
    changed = p * (1 - shift)
    changed[0] += shift
    counts = SliceCounts(k, bucket_seconds=1.0, max_buckets=n + 1)
    mix, ood = ClusterMixCusum(k, arl0=1000.0), BernoulliCusum(arl0=1000.0)
    truth = []
    for t in range(n):
        c = int(rng.choice(k, p=p if t < n // 2 else changed))
        hit = bool(rng.random() < (0.02 if t < n // 2 else 0.02 + shift / 4))
        counts.update(c, p, ood=hit, ood_p0=0.02, time=float(t))
        mix.update(c, p, float(t))
        ood.update(hit, 0.02, float(t))
        truth.append((mix.statistic, ood.statistic))
    points = replay(buckets(counts), {"cluster_mix": mix.snapshot(),
                                      "ood_rate": ood.snapshot()})
    assert len(points) == n
    for pt, (s_mix, s_ood) in zip(points, truth, strict=True):
        assert abs(pt.statistics["cluster_mix"][0] - s_mix) < 1e-9
        assert abs(pt.statistics["ood_rate"][0] - s_ood) < 1e-9
        assert pt.statistics["cluster_mix"][1] == mix.threshold


def test_the_replay_passes_over_counts_that_are_not_numbers() -> None:
    """A checkpoint written while a NaN baseline was still accepted holds NaN expected counts;
    the detectors' tables now refuse NaN, and the replay must not raise on them (its
    statistic there reads 0, as it did)."""
    counts = SliceCounts(3, bucket_seconds=10.0)
    nan = np.array([0.5, np.nan, 0.5])
    for t in range(20):
        counts.update(t % 3, nan, ood=t % 7 == 0, ood_p0=float("nan"), time=float(t))
    dets = {"cluster_mix": ClusterMixCusum(3, arl0=1000.0).snapshot(),
            "ood_rate": BernoulliCusum(arl0=1000.0).snapshot()}
    points = replay(buckets(counts), dets)
    assert [pt.statistics["cluster_mix"][0] for pt in points] == [0.0, 0.0]
    assert [pt.statistics["ood_rate"][0] for pt in points] == [0.0, 0.0]


def test_window_sums_the_buckets_it_selects() -> None:
    counts = SliceCounts(3, bucket_seconds=10.0)
    p = np.full(3, 1 / 3)
    for t in range(100):
        counts.update(t % 3, p, ood=t % 10 == 0, ood_p0=0.1, time=float(t))
    assert window(counts).n == 100
    mid = window(counts, since=20.0, until=49.0)
    assert mid.n == 30 and mid.ood == 3 and sum(mid.clusters) == 30
    assert window(counts, since=1000.0).n == 0
