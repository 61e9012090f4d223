"""The error-rate detector's reference rate keeps the false-alarm budget where the reference's
labels are few (``driftline.core.error_rates``: why the 0.999 posterior quantile).

At the fleet budget (``γ ≈ 2·10⁹`` events), too long to simulate: the Brook–Evans ARL of each
bank member (:mod:`driftline.core.arl`) for labelled events drawn alike from 16 clusters,
averaged over the law of the reference's total errors; ``P(alarm within N) <= Σ_m P(T_m <= N)``
with each member's run length taken as exponential. No run counts: the tolerances are factors
on the budget, stated where asserted.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

from driftline.core.arl import arl_discrete
from driftline.core.bernoulli import ERROR_ALTERNATIVES, bernoulli_table
from driftline.core.budget import DAY, Budget
from driftline.core.cusum import union_threshold
from driftline.core.error_rates import P0_QUANTILE, shrunk_error_rates

GAMMA = Budget(1.0, 30 * DAY, 200, 2, 2.0).arl0()  # the service's default budget
SHIFT = 8 * 3600 * 2  # labelled events in one 8-hour shift, every event labelled
BUDGET_SHIFT = SHIFT / GAMMA  # 2.8e-5
K, N_C, RATE = 16, 100, 0.01


def _p_alarm(p0: np.ndarray, h: float) -> float:
    """Union bound on P(the bank alarms within a shift) with per-cluster ``p0``, every
    cluster erring at ``RATE``."""
    tables = np.stack([bernoulli_table(float(p), ERROR_ALTERNATIVES) for p in p0])  # (K, 2, M)
    probs = np.tile([(1 - RATE) / K, RATE / K], K)
    total = 0.0
    for m in range(tables.shape[2]):
        values = tables[:, :, m].ravel()
        if float(values @ probs) < -0.02 * float(np.abs(values).max()):
            continue  # clearly negative drift: ARL astronomically beyond a shift
        arl = arl_discrete(values.tolist(), probs.tolist(), h, cells=600)
        total += -math.expm1(-SHIFT / arl) if math.isfinite(arl) and arl > 0 else 0.0
    return min(total, 1.0)


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
