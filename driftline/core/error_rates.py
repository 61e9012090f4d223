"""Expected error rate per cluster: reference counts shrunk toward the overall rate.

The error-rate CUSUM (:class:`~driftline.core.bernoulli.ErrorRateCusum`) judges each labelled
event against a reference rate ``p0`` of its cluster. The raw reference rate ``x_c / n_c`` is a
poor ``p0``: a cluster with no error among its ``n_c`` labelled reference events gets ``p0 = 0``
(floored at 1e-9 by the detector), and at a true 1 % every second error crosses the threshold —
a median run of about 170 labelled events, against the billions the false-alarm budget
promises. Any cluster's raw rate is noisy when ``n_c`` is small.

Empirical Bayes (the beta-binomial model; Efron & Morris 1975, Kleinman 1973): the cluster rates
are drawn from ``Beta(m·ē, m·(1-ē))`` and each cluster's rate is the posterior mean

    e_c = (x_c + m·ē) / (n_c + m),

which shrinks small clusters toward the overall rate and leaves well-labelled ones on their own
counts. Here

* ``ē = (X + 1/2) / (N + 1)`` is the Jeffreys posterior mean of the whole reference's rate
  (``X`` errors of ``N`` labelled events), positive even when ``X = 0``;
* the prior strength ``m`` (in pseudo-events) comes from how much the clusters' rates differ
  beyond binomial noise: the intraclass correlation ``ρ = 1/(m + 1)`` of the beta-binomial,
  estimated by the ANOVA moment estimator for binary data (Fleiss, Levin & Paik 2003, §15;
  Ridout, Demétrio & Firth 1999). Rates that differ no more than chance give ``ρ ≤ 0``: the
  clusters are pooled (``m = N``, the cap: the prior is never worth more than the reference).
  ``m`` is at least ``min_errors / ē`` — a prior worth ``min_errors`` (2) pseudo-errors — so that
  a few chance errors in one cluster (an estimated ρ too large) cannot leave a zero-error
  cluster near 0.

A cluster with no labelled reference event is expected to err at ``ē``.

The detector's ``p0`` is not that mean but a **bound**: the highest rates the reference's labels
make plausible, at :data:`P0_QUANTILE` = 0.999, the confidence of the other detectors' bounds
(:data:`~driftline.core.baselines.DEFAULT_CONFIDENCE`). With a point estimate, a reference that
happened to see fewer errors than its clusters make (the overall rate of ~16 errors is itself
known only to ±25 %) puts ``p0`` below the truth, and a CUSUM alarms on that. An alarm thus
means the stream errs more than the reference can explain, not more than a guess.

**A bound on the pooled rate, not on each cluster's.** The bank pools every labelled event of
the slice, whatever its cluster. A member "errors rise to ``ρ·p0``" has a likelihood ratio whose
mean on an event of cluster ``c`` is ``1 + (ρ - 1)(r_c - p0_c)/(1 - p0_c)`` for a true rate
``r_c``, so under no change (the stream's clusters in the reference's labelled proportions
``w_c = n_c/N``) the bank keeps its ``ln γ + ln M`` guarantee when the weighted mean of
``p0_c`` is at least the weighted mean of ``r_c`` (up to the ``1/(1 - p0_c)`` weights, close to
1 at the rates that matter): one cluster's ``p0`` below its rate is offset by the others'. So
``p0_c = s·e_c``, every cluster's posterior mean scaled by one factor ``s = U/ē_w ≥ 1``, where
``ē_w = Σ w_c e_c`` and ``U`` is the ``quantile`` of the pooled rate's Jeffreys posterior
``Beta(X + 1/2, N - X + 1/2)``: the weighted mean of ``p0`` is then ``U``, above the true pooled
rate with probability ``quantile``. It keeps the clusters' differences (an aggressor's high rate
stays high, a clean cluster's low rate low) and widens all of them only by what the reference's
total number of errors leaves open.

Measured (``benchmarks/calibration.py``, 16 clusters × 100 labelled events, the fleet budget's
threshold, P(false alarm in 57,600 labelled events) over the reference law, budget 2.8e-5; see
``benchmarks/results/calibration.md`` for the table): with every cluster at 1 % — the case where
the pooled and per-cluster constructions agree, since the prior then pools the clusters —
posterior mean 0.15, the 0.9 per-cluster quantile (the earlier default) 0.017, 600 times the
budget, and the 0.999 bound about 8e-5, at the price of delay (a tripled rate about 9,700
labelled events instead of 3,700; the 0.999 bound of a 1 % rate known from 16 errors is about
2 %). With clusters that err unlike each other (0.5–2 %, one at 5 %, one at 20 %) the per-cluster
0.999 quantiles widen each small cluster's rate several times over and a tripled rate went
mostly unseen within 40,000 events; the pooled bound widens them only by ``s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from driftline.core.baselines import DEFAULT_CONFIDENCE

MIN_PRIOR_ERRORS = 2.0
_P0_CAP = 0.95
# The error detector's reference rates average to this quantile of the pooled rate (module
# docstring: the confidence of the other detectors' bounds; benchmarks/results/calibration.md).
P0_QUANTILE = DEFAULT_CONFIDENCE


@dataclass(frozen=True)
class ErrorPrior:
    """The Beta prior the cluster rates are shrunk with: mean ``rate``, ``strength`` ``m``
    (pseudo-events), and the estimated intraclass correlation ``rho`` (None: not estimable)."""

    rate: float
    strength: float
    rho: float | None


def intraclass_correlation(errors: NDArray[np.floating], labelled: NDArray[np.floating],
                           ) -> float | None:
    """ANOVA estimator of the intraclass correlation of binary outcomes grouped in clusters.

    ``(MSB - MSW) / (MSB + (n0 - 1)·MSW)`` with between- and within-cluster mean squares and
    ``n0 = (N - Σn_c²/N)/(K - 1)``; over clusters with labelled events. None with fewer than two
    such clusters, or when no cluster varies (no error, or only errors).

    >>> intraclass_correlation(np.array([1, 1, 1, 1.]), np.array([100, 100, 100, 100.]))
    -0.0101...
    >>> round(intraclass_correlation(np.array([40, 2, 3, 1.]), np.array([100, 100, 100, 100.])), 2)
    0.32
    """
    keep = labelled > 0
    x, n = np.asarray(errors, np.float64)[keep], np.asarray(labelled, np.float64)[keep]
    k, total = len(n), float(n.sum())
    if k < 2 or total <= k:
        return None
    r, mean = x / n, float(x.sum()) / total
    msb = float((n * (r - mean) ** 2).sum()) / (k - 1)
    msw = float((n * r * (1.0 - r)).sum()) / (total - k)
    n0 = (total - float((n * n).sum()) / total) / (k - 1)
    denominator = msb + (n0 - 1.0) * msw
    if denominator <= 0.0:
        return None
    return (msb - msw) / denominator


def error_prior(errors: NDArray[np.floating], labelled: NDArray[np.floating], *,
                min_errors: float = MIN_PRIOR_ERRORS) -> ErrorPrior | None:
    """The empirical-Bayes prior of the module docstring; None without labelled events."""
    total = float(np.sum(labelled))
    if total <= 0:
        return None
    rate = (float(np.sum(errors)) + 0.5) / (total + 1.0)
    rho = intraclass_correlation(np.asarray(errors), np.asarray(labelled))
    strength = 1.0 / rho - 1.0 if rho is not None and rho > 0.0 else math.inf
    strength = min(max(strength, min_errors / rate), total)
    return ErrorPrior(rate, strength, rho)


@dataclass(frozen=True)
class ClusterErrorRates:
    """Per cluster: the posterior mean error rate (``expected``) and the detector's reference
    rate ``p0`` (the posterior's ``quantile``), with the prior they come from."""

    expected: NDArray[np.float64]
    p0: NDArray[np.float64]
    quantile: float
    prior: ErrorPrior


def shrunk_error_rates(errors: NDArray[np.floating], labelled: NDArray[np.floating], *,
                       quantile: float = P0_QUANTILE, min_errors: float = MIN_PRIOR_ERRORS,
                       ) -> ClusterErrorRates | None:
    """Per-cluster error rates under the empirical-Bayes prior; None when the reference has no
    labelled event.

    The posterior of cluster ``c`` is ``Beta(x_c + m·ē, n_c - x_c + m·(1-ē))``: its mean is
    ``expected``; the detector's ``p0`` is ``expected`` scaled so that its labelled-weighted mean
    is the ``quantile`` of the pooled rate (module docstring).

    Parameters
    ----------
    errors, labelled
        Per cluster: labelled reference events that were errors, and labelled events.
    quantile
        Posterior quantile of the pooled rate that the detector's reference rates average to
        (0.5 < quantile < 1).
    min_errors
        The prior is worth at least this many pseudo-errors (``m ≥ min_errors/ē``).

    Examples
    --------
    Sixteen clusters of 100 labelled events erring alike (about 1 %): a cluster without an
    error is expected near the overall rate, not at 0.

    >>> x = np.array([0, 1, 2, 1, 0, 1, 1, 2, 1, 1, 0, 2, 1, 1, 1, 1])
    >>> r = shrunk_error_rates(x, np.full(16, 100))
    >>> round(r.prior.rate, 4), r.prior.strength, round(float(r.expected[0]), 4)
    (0.0103, 1600.0, 0.0097)
    >>> round(float(r.p0[0]), 4)  # scaled to the pooled rate's 0.999 bound: the detector's
    0.0187

    An aggressor (40 % against 2 %) keeps its own rate; the others are shrunk a little. The
    detector's rates keep those differences, all widened by one factor:

    >>> r = shrunk_error_rates(np.array([40, 2, 0, 3]), np.array([100, 100, 100, 100]))
    >>> [round(float(e), 3) for e in r.expected], round(r.prior.strength, 1)
    ([0.357, 0.034, 0.017, 0.043], 17.6)
    >>> [round(float(e), 3) for e in r.p0]
    [0.531, 0.051, 0.025, 0.063]
    """
    if not 0.5 < quantile < 1.0:
        raise ValueError("quantile must be in (0.5, 1)")
    prior = error_prior(errors, labelled, min_errors=min_errors)
    if prior is None:
        return None
    x = np.asarray(errors, np.float64)
    n = np.asarray(labelled, np.float64)
    a = x + prior.strength * prior.rate
    b = n - x + prior.strength * (1.0 - prior.rate)
    expected = a / (a + b)
    total, wrong = float(n.sum()), float(x.sum())
    pooled_bound = float(stats.beta.ppf(quantile, wrong + 0.5, total - wrong + 0.5))
    scale = max(1.0, pooled_bound / float(n @ expected / total))
    # a rate scaled to 1 or beyond would be no reference at all: keep it below (the bank's
    # alternatives are capped below 1 too)
    p0 = np.minimum(expected * scale, np.maximum(expected, _P0_CAP))
    return ClusterErrorRates(expected, np.asarray(p0, np.float64), quantile, prior)
