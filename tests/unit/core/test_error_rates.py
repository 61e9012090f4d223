"""The error-rate detector's reference rate keeps the false-alarm budget where the reference's
labels are few, and keeps the clusters' differences (``driftline.core.error_rates``: why a
bound on the pooled rate).

At the fleet budget (``γ ≈ 2·10⁹`` events), too long to simulate: the Brook–Evans ARL of each
bank member (:mod:`driftline.core.arl`) for labelled events drawn alike from 16 clusters,
averaged over the law of the reference's total errors; ``P(alarm within N) <= Σ_m P(T_m <= N)``
with each member's run length taken as exponential. No run counts: the tolerances are factors
on the budget, stated where asserted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binom

from driftline.core.arl import arl_discrete, bank_alarm_probability
from driftline.core.bernoulli import ERROR_ALTERNATIVES, bernoulli_table
from driftline.core.budget import DAY, Budget
from driftline.core.cusum import union_threshold
from driftline.core.error_rates import P0_QUANTILE, shrunk_error_rates

GAMMA = Budget(1.0, 30 * DAY, 200, 2, 2.0).arl0()  # the service's default budget
SHIFT = 8 * 3600 * 2  # labelled events in one 8-hour shift, every event labelled
BUDGET_SHIFT = SHIFT / GAMMA  # 2.8e-5
K, N_C, RATE = 16, 100, 0.01


def _p_alarm(p0: np.ndarray, h: float, rates: np.ndarray | float = RATE) -> float:
    """Union bound on P(the bank alarms within a shift) with per-cluster ``p0``, cluster ``c``
    erring at ``rates[c]``, labelled events drawn from the clusters alike."""
    q = np.broadcast_to(np.asarray(rates, np.float64), (K,))
    tables = np.stack([bernoulli_table(float(p), ERROR_ALTERNATIVES) for p in p0])  # (K, 2, M)
    probs = np.stack([(1 - q) / K, q / K], axis=1).ravel()
    members = [tables[:, :, m].ravel().tolist() for m in range(tables.shape[2])]
    return bank_alarm_probability(members, probs.tolist(), h, SHIFT)


def _mean_p_alarm(quantile: float) -> float:
    """Clusters erring alike (the pooled case, where every cluster's p0 follows the
    reference's total ``x``), averaged over ``x ~ Binomial(K·N_C, RATE)``."""
    h = union_threshold(GAMMA, len(ERROR_ALTERNATIVES))
    n, total = K * N_C, 0.0
    for x in range(60):
        per = np.full(K, x // K, np.float64)
        per[: x % K] += 1
        rates = shrunk_error_rates(per, np.full(K, float(N_C)), quantile=quantile)
        assert rates is not None
        total += float(binom.pmf(x, n, RATE)) * _p_alarm(rates.p0, h)
    return total


def test_the_error_detector_keeps_the_budget_when_clusters_err_alike() -> None:
    before = _mean_p_alarm(0.9)
    after = _mean_p_alarm(P0_QUANTILE)
    assert before > 100 * BUDGET_SHIFT  # 0.017 at the 0.9 quantile: ~600 times the budget
    assert after <= 4 * BUDGET_SHIFT  # 8e-5 (2.9 x): the order the OOD detector keeps


# Clusters that err unlike each other: small ones at 0.5–2 %, one at 5 %, an aggressor at 20 %.
UNLIKE = np.concatenate([np.linspace(0.005, 0.02, K - 2), [0.05, 0.20]])


def _delay(p0: np.ndarray, h: float, factor: float) -> float:
    """Labelled events to the bank's alarm after every cluster's rate rose ``factor``-fold:
    the Brook–Evans ARL from zero of the bank's quickest member (a lower bound of the bank's
    delay that is close to it when one member dominates)."""
    q = factor * UNLIKE
    tables = np.stack([bernoulli_table(float(p), ERROR_ALTERNATIVES) for p in p0])
    probs = np.stack([(1 - q) / K, q / K], axis=1).ravel()
    best = math.inf
    for m in range(tables.shape[2]):
        values = tables[:, :, m].ravel()
        if float(values @ probs) > 0:  # a member drifting down never alarms in practice
            best = min(best, arl_discrete(values.tolist(), probs.tolist(), h, cells=600))
    return best


def _per_cluster_quantile(errors: np.ndarray, quantile: float) -> np.ndarray:
    """The previous construction: each cluster's own posterior quantile."""
    r = shrunk_error_rates(errors, np.full(K, float(N_C)))
    assert r is not None
    a = errors + r.prior.strength * r.prior.rate
    b = N_C - errors + r.prior.strength * (1.0 - r.prior.rate)
    return np.asarray(beta.ppf(quantile, a, b), np.float64)


def test_clusters_that_err_unlike_each_other_keep_the_budget_and_a_short_delay() -> None:
    h = union_threshold(GAMMA, len(ERROR_ALTERNATIVES))
    # references drawn from the true rates (seed fixed); the false-alarm bound is averaged over
    # them, the delay read at the median reference
    refs = np.random.default_rng(5).binomial(N_C, UNLIKE, size=(40, K)).astype(np.float64)
    pooled = [shrunk_error_rates(x, np.full(K, float(N_C))) for x in refs]
    assert all(r is not None for r in pooled)
    p0s = np.stack([r.p0 for r in pooled if r is not None])
    # the weighted mean of p0 is the pooled rate's bound, each cluster widened by one factor
    for x, p0, r in zip(refs, p0s, pooled, strict=True):
        assert r is not None
        bound = beta.ppf(P0_QUANTILE, x.sum() + 0.5, K * N_C - x.sum() + 0.5)
        assert float(p0.mean()) == pytest.approx(bound, rel=1e-9)
        assert np.ptp(p0 / r.expected) < 1e-9
    false_alarms = float(np.mean([_p_alarm(p0, h, UNLIKE) for p0 in p0s]))
    assert false_alarms <= 4 * BUDGET_SHIFT  # the budget's order, as for clusters alike
    median = int(np.argsort(refs.sum(axis=1))[len(refs) // 2])
    pooled_delay = _delay(p0s[median], h, 3.0)
    per_cluster_delay = _delay(_per_cluster_quantile(refs[median], P0_QUANTILE), h, 3.0)
    # a tripled error rate: about a thousand labelled events with the pooled bound; with each
    # cluster's own 0.999 quantile (small clusters widened 3-4 fold) no member drifts up
    assert pooled_delay < 5_000  # 1,100 here
    assert per_cluster_delay > 40_000  # no member drifts up: "none within 40,000" measured
