"""The statistics behind the domain-gap and model-version endpoints (pure: numpy and scipy).

* :func:`js_matrix` — Jensen–Shannon divergence (base 2, so in ``[0, 1]``) between cluster
  mixes smoothed by adding ``alpha`` to every count (a cluster no event of a slice fell in
  does not make the divergence jump to its maximum on small samples).
* :func:`mix_test`, :func:`rate_test`, :func:`location_test` — two-sample tests: Fisher's exact
  test for 2×2 tables, the chi-square test of homogeneity for 2×L prediction mixes, and the
  Mann–Whitney U test for confidences.
* :func:`holm` — Holm's step-down adjustment (Holm 1979), controlling the family-wise error
  rate over every test of one comparison without assuming independence.

>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon


@dataclass(frozen=True)
class Test:
    name: str
    statistic: float | None
    p_value: float


def smoothed(counts: Sequence[float], alpha: float) -> np.ndarray:
    c = np.asarray(counts, np.float64) + alpha
    out: np.ndarray = c / c.sum()
    return out


def js_matrix(mixes: Sequence[np.ndarray]) -> list[list[float]]:
    """Pairwise JS divergence (bits) between probability vectors of equal length."""
    n = len(mixes)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d = float(jensenshannon(mixes[i], mixes[j], base=2) ** 2)
            out[i][j] = out[j][i] = round(d, 6)
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def mix_test(a: Sequence[int], b: Sequence[int]) -> Test | None:
    """Do two category-count vectors come from the same mix? None if fewer than 2 categories
    are used or a side is empty."""
    table = np.asarray([a, b], np.int64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return None
    if table.shape[1] == 2:
        odds, p = stats.fisher_exact(table)
        return Test("fisher", _finite(odds), float(p))
    chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    return Test("chi2", _finite(chi2), float(p))


def rate_test(hits_a: int, n_a: int, hits_b: int, n_b: int) -> Test | None:
    """Fisher's exact test of two proportions; None if a side has no trials."""
    if n_a <= 0 or n_b <= 0:
        return None
    odds, p = stats.fisher_exact([[hits_a, n_a - hits_a], [hits_b, n_b - hits_b]])
    return Test("fisher", _finite(odds), float(p))


def location_test(a: Sequence[float], b: Sequence[float], min_n: int = 5) -> Test | None:
    """Mann–Whitney U (two-sided); None below ``min_n`` values a side or if all are equal."""
    if len(a) < min_n or len(b) < min_n or len(set(a) | set(b)) < 2:
        return None
    u, p = stats.mannwhitneyu(a, b, alternative="two-sided")
    return Test("mannwhitneyu", _finite(u), float(p))
