"""Average run length of a single CUSUM by the Brook–Evans Markov-chain approximation.

The CUSUM ``S ← max(0, S + X)`` with i.i.d. increments is a Markov process on ``[0, h)``; on a
lattice of step ``w = h / cells`` the ARL vector solves ``(I - P) L = 1`` (Brook & Evans 1972),
the discretised form of Page's integral equation. Two increment laws are supported:

* **discrete** increments (categorical or Bernoulli LLRs): each value is split between its two
  neighbouring lattice points with weights that preserve its mean, so the drift — the quantity
  the ARL is most sensitive to — is exact; the error is ``O(w²)``;
* **normal** increments ``N(μ, σ²)`` (the Gaussian mean-shift anchors): cell-midpoint rule.

Used to find the threshold of the *optimal* CUSUM (which knows the post-change law) at a given
ARL0, the reference the detection benchmark compares delays against, and to bound a bank's
false-alarm probability over a period (:func:`bank_alarm_probability`), where the calibration
tests and benchmark need run lengths far beyond simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import brentq
from scipy.sparse.linalg import spsolve
from scipy.special import ndtr

from driftline.core.cusum import FloatArray


def _solve(h_cells: int, rows: list[int], cols: list[int], vals: list[float]) -> FloatArray:
    p = sparse.csc_matrix((vals, (rows, cols)), shape=(h_cells, h_cells))
    a = sparse.identity(h_cells, format="csc") - p
    return np.asarray(spsolve(a, np.ones(h_cells)), dtype=np.float64)


def arl_discrete(
    values: Sequence[float], probs: Sequence[float], threshold: float, *, cells: int = 4000
) -> float:
    """ARL from ``S = 0`` (events until alarm, the alarming one included) for i.i.d. increments
    taking ``values[i]`` with probability ``probs[i]``.

    >>> round(arl_discrete([1.0, -1.0], [0.5, 0.5], 3.0, cells=300), 6)  # ±1 walk: h(h+1)
    12.0
    """
    w = threshold / cells
    steps: dict[int, float] = {}
    for v, q in zip(values, probs, strict=True):
        x = max(v, -threshold - w) / w  # any step <= -h restarts at zero (also v = -inf)
        lo = math.floor(x)
        steps[lo] = steps.get(lo, 0.0) + q * (1.0 - (x - lo))
        steps[lo + 1] = steps.get(lo + 1, 0.0) + q * (x - lo)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    idx = np.arange(cells)
    for d, q in steps.items():
        if q <= 0.0:
            continue
        j = idx + d
        ok = j < cells
        rows += idx[ok].tolist()
        cols += np.maximum(j[ok], 0).tolist()
        vals += [q] * int(ok.sum())
    return float(_solve(cells, rows, cols, vals)[0])


def bank_alarm_probability(members: Sequence[Sequence[float]], probs: Sequence[float],
                           threshold: float, horizon: float, *, cells: int = 600) -> float:
    """Union bound on the probability that some member of a CUSUM bank alarms within
    ``horizon`` events: ``Σ_m P(T_m <= horizon)``, each member's run length taken as exponential
    with its Brook–Evans ARL (accurate when the ARL is far beyond the horizon, the regime of a
    false-alarm budget), capped at 1.

    ``members[m][i]`` is member ``m``'s increment on outcome ``i``, which has probability
    ``probs[i]``. A member with a clearly negative drift (below ``-0.02`` of its largest step)
    has an ARL astronomically beyond any horizon and is skipped.

    >>> p = bank_alarm_probability([[1.0, -1.0]], [0.5, 0.5], 3.0, 12.0, cells=300)
    >>> round(p, 3)  # ARL 12 (a ±1 walk), horizon 12: 1 - e^-1
    0.632
    """
    total = 0.0
    for values in members:
        drift = sum(v * q for v, q in zip(values, probs, strict=True))
        if drift < -0.02 * max(abs(v) for v in values):
            continue
        arl = arl_discrete(list(values), list(probs), threshold, cells=cells)
        total += -math.expm1(-horizon / arl) if math.isfinite(arl) and arl > 0 else 0.0
    return min(total, 1.0)


def arl_normal(mean: float, sd: float, threshold: float, *, cells: int = 600) -> float:
    """ARL from ``S = 0`` for i.i.d. ``N(mean, sd²)`` increments (Brook–Evans, midpoint rule).

    >>> round(arl_normal(-0.5, 1.0, 4.0))  # k = 0.5, h = 4 (the two-sided chart: 168)
    334
    """
    w = threshold / cells
    centres = np.arange(cells) * w
    edges = (np.arange(cells + 1) - 0.5) * w
    cdf = ndtr((edges[None, :] - centres[:, None] - mean) / sd)
    p = np.diff(cdf, axis=1)
    p[:, 0] = cdf[:, 1]  # everything at or below the first cell's edge restarts at zero
    a = np.eye(cells) - p
    return float(np.linalg.solve(a, np.ones(cells))[0])


def threshold_for_arl(arl: Callable[[float], float], target: float, lo: float = 1e-3) -> float:
    """Threshold ``h`` with ``arl(h) = target`` (``arl`` increasing in ``h``), by Brent's method.

    >>> h = threshold_for_arl(lambda h: arl_normal(-0.5, 1.0, h), 1000.0)
    >>> round(h, 2), round(arl_normal(0.5, 1.0, h), 1)  # Gaussian δ = 1 at ARL0 = 10³
    (5.07, 10.5)
    """
    hi = 1.0
    while arl(hi) < target:  # bracket by doubling: ARL grows about like e^h
        lo, hi = hi, 2.0 * hi
    return float(brentq(lambda h: math.log(arl(h)) - math.log(target), lo, hi, xtol=1e-6))
