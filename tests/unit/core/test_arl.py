"""Brook–Evans ARLs against DESIGN.md §8's anchors and against simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driftline.core.arl import arl_discrete, arl_normal, threshold_for_arl
from driftline.core.simulate import simulate, single_model


@pytest.mark.parametrize(
    ("delta", "gamma", "delay"),
    [(1.0, 1e3, 10.5), (1.0, 1e4, 15.1), (0.5, 1e3, 31.1), (0.5, 1e4, 49.1)],
)
def test_gaussian_anchors(delta: float, gamma: float, delay: float) -> None:
    i = delta**2 / 2  # LLR ~ N(∓I, 2I) before / after the change
    sd = math.sqrt(2 * i)
    h = threshold_for_arl(lambda h: arl_normal(-i, sd, h), gamma)
    assert arl_normal(i, sd, h) == pytest.approx(delay, abs=0.05)


def _cluster_llr(k: int, eps: float) -> tuple[list[float], list[float], list[float]]:
    """Mass ε moved into one of K uniform clusters (q_k = 1/K + ε): LLR values, p, q."""
    p, q = 1 / k, 1 / k + eps
    return [math.log(q / p), math.log((1 - q) / (1 - p))], [p, 1 - p], [q, 1 - q]


@pytest.mark.parametrize(
    ("eps", "gamma", "delay"),
    [(0.10, 1e3, 48.8), (0.10, 1e4, 85.4), (0.05, 1e3, 114), (0.05, 1e4, 231)],
)
def test_cluster_anchors(eps: float, gamma: float, delay: float) -> None:
    values, p, q = _cluster_llr(16, eps)
    h = threshold_for_arl(lambda h: arl_discrete(values, p, h), gamma)
    assert arl_discrete(values, q, h) == pytest.approx(delay, rel=0.01)


def test_discrete_chain_matches_simulation() -> None:
    values, p, q = _cluster_llr(16, 0.10)
    h = 3.537  # ARL0 ≈ 1000
    arl0, arl1 = arl_discrete(values, p, h), arl_discrete(values, q, h)
    model = single_model(values)
    for probs, expected, seed in ((p, arl0, 1), (q, arl1, 2)):
        t = simulate([model], [[h]], np.array(probs), n_runs=4000, horizon=10**6, seed=seed)
        times = t[0].times[:, 0]
        assert abs(times.mean() - expected) <= 3 * times.std() / math.sqrt(times.size)
