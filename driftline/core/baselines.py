"""Reference baselines: which cluster mix and OOD rate an event should be judged against.

A baseline exists for the whole reference (``global``), for each station, and for each
station×shift, when it has at least ``min_count`` reference samples; otherwise the event falls
back to its parent (station×shift → station → global). Keys follow the slice-id convention of
:func:`driftline.schema.slice_id`: ``global``, ``station=s1``, ``station=s1|shift=night``.

Cluster distributions are smoothed toward the parent's distribution (toward uniform for
``global``) with ``alpha`` pseudo-counts per cluster, so no cluster has ``p = 0`` — the
cluster-mix CUSUM's increment ``ln((1-ε) + ε/p_k)`` needs ``p_k > 0`` — and a station that
saw a cluster rarely inherits the fleet's idea of how rare it is rather than a guess.

**Stated rates and the detectors' rates.** ``p`` and ``ood_rate`` are point estimates from a
finite reference sample: what the reference *states*, shown as evidence ("26 % expected → 43 %
seen"). A detector that took them as the exact pre-change law would pay for their sampling error
in false alarms: a CUSUM set for ``ARL0 = γ ≈ 10⁹`` drifts up as soon as the true rate is a
little above the stated one, and with 120 reference samples it usually is for some cell
(Jensen et al. 2006 review the effect for control charts). So each baseline also carries the
law its detectors judge against, the least favourable one within a confidence set of the
reference sample (:func:`tail_rate_bound`, :func:`mix_bounds`), chosen so that every bank
member's likelihood ratio stays a supermartingale for every true law in the set: the
``ln γ + ln M`` guarantee then holds for the reference actually drawn with probability at least
``confidence`` (a guaranteed-conditional-performance design in the sense of Gandy & Kvaløy 2013,
with the robust CUSUM's least favourable laws of Unnikrishnan, Veeravalli & Meyn 2011).

References
----------
C. J. Clopper, E. S. Pearson, "The use of confidence or fiducial limits illustrated in the case
of the binomial", Biometrika 26, 1934.
W. A. Jensen, L. A. Jones-Farmer, C. W. Champ, W. H. Woodall, "Effects of parameter estimation
on control chart properties: a literature review", J. Quality Technology 38, 2006.
A. Gandy, J. T. Kvaløy, "Guaranteed conditional performance of control charts via bootstrap
methods", Scand. J. Statistics 40, 2013.
J. Unnikrishnan, V. V. Veeravalli, S. P. Meyn, "Minimax robust quickest change detection",
IEEE Trans. Information Theory 57, 2011.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy.stats import beta

GLOBAL = "global"
# Probability, over the reference sample, that every bound of a baseline holds: the detectors'
# false-alarm guarantee is then that of the budget. 0.999 keeps the expected false alarms of a
# 120-sample station×shift cell within ~3x of the budget (benchmarks/results/calibration.md).
DEFAULT_CONFIDENCE = 0.999


def choose_k(n: int, *, k_min: int = 2, k_max: int = 32, min_per_cluster: int = 20) -> int:
    """Default number of clusters for ``n`` reference samples: ``round(sqrt(n / 10))``.

    The square root grows slowly, so a station×shift baseline of a few hundred samples still
    sees each cluster a handful of times; ``k_max`` keeps the CUSUM bank (cost ≈ ln K in
    threshold) and the list of cluster descriptions a person reads short.

    >>> [choose_k(n) for n in (100, 1_000, 2_560, 10_000, 1_000_000)]
    [3, 10, 16, 32, 32]
    """
    k = round(math.sqrt(n / 10))
    k = min(k, n // min_per_cluster, k_max)
    return max(k_min, k)


def smoothed(counts: NDArray[np.int64], prior: NDArray[np.float64], alpha: float,
             ) -> NDArray[np.float64]:
    """``(counts + alpha·K·prior) / (n + alpha·K)``: additive smoothing toward ``prior``.

    >>> smoothed(np.array([3, 0, 1]), np.full(3, 1 / 3), 1.0).round(3).tolist()
    [0.571, 0.143, 0.286]
    """
    pseudo = alpha * len(counts)
    p = (counts + pseudo * prior) / (counts.sum() + pseudo)
    return np.asarray(p, np.float64)


def ood_threshold(distances: NDArray[np.floating], quantile: float) -> tuple[float, float, int]:
    """Threshold at ``quantile`` of leave-one-out distances, and its exceedance rate.

    The rate is ``(#{d > t} + 1) / (n + 1)``: for a new sample exchangeable with the reference
    this is exactly the probability that it exceeds ``t`` (the conformal rank argument), and
    it is never 0, which a Bernoulli CUSUM on exceedances needs. Returns
    ``(threshold, rate, exceed_count)``.

    >>> t, rate, exceed = ood_threshold(np.arange(100.0), 0.9)
    >>> t, round(rate, 4), exceed
    (90.0, 0.099, 9)
    """
    t = float(np.quantile(distances, quantile, method="higher"))
    exceed = int(np.count_nonzero(distances > t))
    return t, (exceed + 1) / (len(distances) + 1), exceed


def tail_rate_bound(n: int, beyond: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Upper ``confidence`` bound of the true rate at which a new value falls beyond a cut that
    ``beyond`` of ``n`` reference values fall beyond: the pre-change rate ``p0`` of the OOD
    detector (distances above the OOD threshold) and of the low-confidence detector (scores
    below the low-confidence cut, :mod:`driftline.core.predictions`).

    For a cut at an order statistic of ``n`` exchangeable values, the probability ``U`` that a
    new one falls beyond it is distributed ``Beta(k + 1, n - k)`` over reference samples
    (``k = beyond``: the coverage of an order statistic; its mean is the stated
    ``(k + 1)/(n + 1)``), whatever the values' law. Its upper quantile is also the
    Clopper–Pearson upper bound of ``k`` successes in ``n`` trials, so the bound holds too when
    ties pin the cut to a value (scores saturating at 1.0) and ``k`` is a plain binomial count.
    With ``p0`` at that quantile, ``U <= p0`` with probability ``confidence``, and then every
    member of the Bernoulli bank (an increase ``ρ·p0``) has a likelihood ratio whose mean under
    ``U`` is at most 1 (the mean grows with ``U`` and is 1 at ``U = p0``), which is all the
    ``ln γ + ln M`` threshold needs.

    Parameters
    ----------
    n
        Reference values the cut was set on.
    beyond
        How many of them fall beyond it (``0 <= beyond < n``).
    confidence
        Probability, over reference samples, that the bound holds.

    Examples
    --------
    The 99th percentile of 120 distances (one beyond it) states 1.65 %; its true rate lies
    anywhere from 0.1 % to 7 %:

    >>> round(2 / 121, 4), round(tail_rate_bound(120, 1, 0.999), 4)
    (0.0165, 0.0744)
    >>> round(tail_rate_bound(10_000, 99, 0.999), 4)  # a large baseline pays little
    0.0134

    A 5 % low-confidence cut on 200 scores (9 below it) states 5 %; the detector takes 11 %:

    >>> round(10 / 201, 4), round(tail_rate_bound(200, 9, 0.999), 4)
    (0.0498, 0.1095)

    References
    ----------
    H. A. David, H. N. Nagaraja, *Order Statistics*, 3rd ed., Wiley, 2003, §2.5 (coverages).
    C. J. Clopper, E. S. Pearson, Biometrika 26, 1934.
    """
    if not 0 <= beyond < n or not 0.0 < confidence < 1.0:
        raise ValueError("need 0 <= beyond < n and 0 < confidence < 1")
    return float(beta.isf(1.0 - confidence, beyond + 1, n - beyond))


def mix_bounds(counts: NDArray[np.integer], prior: NDArray[np.float64], alpha: float,
               confidence: float = DEFAULT_CONFIDENCE
               ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-cluster lower and upper bounds of a baseline's true cluster mix, simultaneous at
    ``confidence``: what the cluster-mix detector judges against.

    Member "mass ``ε`` into cluster ``k``" of :mod:`driftline.core.mix` has a likelihood ratio
    of mean ``(1 - ε) + ε·q_k/p_k`` under a true mix ``q``, at most 1 exactly when
    ``q_k <= p_k``; "a fraction ``f`` out of ``k``" has mean ``1 - f·(q_k - p_k)/(1 - p_k)``,
    at most 1 exactly when ``q_k >= p_k``. So the least favourable mix in a confidence set for
    ``q`` gives "into k" members ``p_k`` at its **upper** bound and "out of k" members ``p_k``
    at its **lower** bound (each member's other clusters renormalised, which leaves its
    increments unchanged): each member is then a likelihood ratio against a law at least as
    favourable to it as the truth, and ``ln γ + ln M`` keeps ``ARL0 >= γ`` (a robust CUSUM:
    Unnikrishnan, Veeravalli & Meyn 2011).

    The ``2K`` one-sided bounds are each taken at ``δ = (1 - confidence)/(2K)`` (Bonferroni),
    so all hold together with probability ``>= confidence``. Each is the wider of two: the
    exact Clopper–Pearson bound of ``counts[k]`` of ``n`` (the true mix taken as fixed), and
    the quantile of the marginal ``Beta(a_k, A - a_k)`` of the Dirichlet posterior whose mean
    is the smoothed ``p`` (``a = counts + alpha·K·prior``; the true mix taken as drawn from the
    build's own model), so the guarantee holds under either reading.

    Parameters
    ----------
    counts
        Reference samples per cluster.
    prior
        The parent's smoothed mix (uniform for ``global``), as in :func:`smoothed`.
    alpha
        Smoothing pseudo-counts per cluster, as in :func:`smoothed`.
    confidence
        Probability, over reference samples, that every bound holds.

    Returns
    -------
    lower, upper
        Arrays of shape ``(K,)`` with ``lower <= smoothed(counts, prior, alpha) <= upper``.

    Examples
    --------
    A 16-cluster mix seen through 120 samples (7 or 8 per cluster) bounds a cluster's share of
    6 % to 0.7–19 %; through 10,000 samples, to 5.3–7.3 %:

    >>> counts, prior = np.array([8, 7] * 8), np.full(16, 1 / 16)
    >>> lo, hi = mix_bounds(counts, prior, 0.5)
    >>> p = smoothed(counts, prior, 0.5)
    >>> [round(float(x[1]), 3) for x in (lo, p, hi)]
    [0.007, 0.059, 0.19]
    >>> lo, hi = mix_bounds(np.full(16, 625), np.full(16, 1 / 16), 0.5)
    >>> round(float(lo[0]), 3), round(float(hi[0]), 3)
    (0.053, 0.073)

    References
    ----------
    C. J. Clopper, E. S. Pearson, Biometrika 26, 1934.
    J. Unnikrishnan, V. V. Veeravalli, S. P. Meyn, IEEE Trans. Information Theory 57, 2011.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("need 0 < confidence < 1")
    c = np.asarray(counts, np.float64)
    k, n = c.size, float(c.sum())
    delta = (1.0 - confidence) / (2 * k)
    a = c + alpha * k * np.asarray(prior, np.float64)
    b = (n + alpha * k) - a
    with np.errstate(invalid="ignore", divide="ignore"):
        upper = np.fmax(beta.isf(delta, a, b), beta.isf(delta, c + 1.0, n - c))
        lower = np.fmin(beta.ppf(delta, a, b), beta.ppf(delta, c, n - c + 1.0))
    # degenerate Beta laws: every sample in k (upper 1), none (Clopper–Pearson lower 0)
    upper = np.where(np.isnan(upper) | (c >= n), 1.0, upper)
    lower = np.where(np.isnan(lower) | (c <= 0), np.fmin(np.nan_to_num(lower), 0.0), lower)
    return np.asarray(lower, np.float64), np.asarray(upper, np.float64)


@dataclass(frozen=True)
class Baseline:
    """The reference an event is judged against: stated rates (``p``, ``ood_rate``: point
    estimates, shown as evidence) and the detectors' (``p_lower``/``p_upper``,
    ``ood_rate_bound``: the least favourable laws at ``confidence``)."""

    key: str
    parent: str | None
    n: int
    counts: tuple[int, ...]
    p: tuple[float, ...]
    ood_threshold: float
    ood_rate: float
    ood_exceed: int
    p_lower: tuple[float, ...] = ()
    p_upper: tuple[float, ...] = ()
    ood_rate_bound: float = math.nan


def checked_bounds(p: NDArray[np.float64], lower: Any, upper: Any) -> NDArray[np.float64] | None:
    """Stored mix bounds as a ``(2, K)`` array if the detectors can use them — finite, within
    [0, 1], ``lower <= p <= upper`` — else None (a NaN or null bound made a bank that never
    alarms; an empty one a ``(2, 0)`` array).

    >>> p = np.array([0.5, 0.5])
    >>> checked_bounds(p, [0.4, 0.4], [0.6, 0.6]).tolist()
    [[0.4, 0.4], [0.6, 0.6]]
    >>> checked_bounds(p, [0.4, None], [0.6, 0.6]), checked_bounds(p, (), ())
    (None, None)
    """
    try:
        b = np.array([lower, upper], np.float64)  # None -> NaN
    except (TypeError, ValueError):  # ragged, or not numbers
        return None
    ok = (b.shape == (2, p.size) and bool(np.isfinite(b).all()) and bool((b >= 0.0).all())
          and bool((b <= 1.0).all()) and bool((b[0] <= p).all()) and bool((p <= b[1]).all()))
    return b if ok else None


def checked_rate_bound(rate: float, bound: Any) -> float | None:
    """A stored rate bound if the detectors can use it — finite, ``rate <= bound <= 1`` —
    else None.

    >>> checked_rate_bound(0.01, 0.02), checked_rate_bound(0.01, float("nan"))
    (0.02, None)
    """
    try:
        x = float(bound)
    except (TypeError, ValueError):  # None, or not a number
        return None
    return x if math.isfinite(x) and rate <= x <= 1.0 else None


def frozen(a: Any) -> NDArray[np.float64]:
    """``a`` as a read-only float64 array: itself if it owns its data, else a copy (through a
    view its base could still change it). The detectors cache increment tables by array
    identity (:func:`driftline.core.mix.mix_tables`), so an array they judge against must not
    change in place: a write raises instead of serving stale tables.

    >>> b = frozen([0.5, 0.5])
    >>> b.flags.writeable, frozen(b) is b
    (False, True)
    """
    out = np.asarray(a, np.float64)
    if not out.flags.writeable and out.flags.owndata:
        return out
    if not out.flags.owndata:
        out = out.copy()
    out.setflags(write=False)
    return out


class _DetectorBaseline(NamedTuple):
    p: NDArray[np.float64]
    bounds: NDArray[np.float64]
    ood_rate: float
    ood_bound: float


class DetectorBaseline(_DetectorBaseline):
    """One baseline as the detect stage uses it: the stated mix ``p`` and OOD rate (evidence,
    gauges) and what the detectors judge against — ``bounds`` (``(2, K)``: lower, upper; see
    :mod:`driftline.core.mix`) and ``ood_bound``. One array object per baseline, so detectors
    find their increment tables by identity; read-only (:func:`frozen`), so that they stay
    right."""

    __slots__ = ()

    def __new__(cls, p: Any, bounds: Any, ood_rate: float, ood_bound: float
                ) -> DetectorBaseline:
        return super().__new__(cls, frozen(p), frozen(bounds), ood_rate, ood_bound)

    @classmethod
    def exact(cls, p: Any, ood_rate: float) -> DetectorBaseline:
        """A baseline known exactly: its detectors judge against the stated rates themselves
        (bounds ``lower = upper = p``, ``ood_bound = ood_rate``).

        >>> b = DetectorBaseline.exact([0.5, 0.5], 0.01)
        >>> b.bounds.tolist(), b.ood_bound
        ([[0.5, 0.5], [0.5, 0.5]], 0.01)
        """
        p = frozen(p)
        return cls(p, np.stack([p, p]), ood_rate, ood_rate)


def station_key(station: str) -> str:
    return f"station={station}"


def station_shift_key(station: str, shift: str) -> str:
    return f"station={station}|shift={shift}"


def baseline_cells(
    stations: Sequence[str], shifts: Sequence[str], *, min_count: int = 200,
) -> dict[str, tuple[str | None, NDArray[np.bool_]]]:
    """Which reference samples each baseline covers: per key, its parent and a mask.

    ``global`` always; each station and each station×shift with at least ``min_count`` samples,
    in parent-before-child order (a station×shift's parent is its station when the station has
    a baseline, else ``global``).

    >>> cells = baseline_cells(["a"] * 3 + ["b"], ["x", "x", "y", "x"], min_count=2)
    >>> {k: (parent, mask.tolist()) for k, (parent, mask) in cells.items()}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'global': (None, [True, True, True, True]),
     'station=a': ('global', [True, True, True, False]),
     'station=a|shift=x': ('station=a', [True, True, False, False])}
    """
    st = np.asarray(stations, dtype=object)
    sh = np.asarray(shifts, dtype=object)
    out: dict[str, tuple[str | None, NDArray[np.bool_]]] = {
        GLOBAL: (None, np.ones(len(st), bool))}
    for station in sorted(set(st.tolist())):
        in_station = st == station
        parent = GLOBAL
        if in_station.sum() >= min_count:
            out[station_key(station)] = (GLOBAL, in_station)
            parent = station_key(station)
        for shift in sorted(set(sh[in_station].tolist())):
            cell = in_station & (sh == shift)
            if cell.sum() >= min_count:
                out[station_shift_key(station, shift)] = (parent, cell)
    return out


def build_baselines(
    clusters: NDArray[np.integer], distances: NDArray[np.floating], stations: Sequence[str],
    shifts: Sequence[str], k: int, *, min_count: int = 200, alpha: float = 0.5,
    quantile: float = 0.99, confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Baseline]:
    """Global, per-station and per-station×shift baselines with at least ``min_count`` samples.

    ``clusters[i]`` and ``distances[i]`` (leave-one-out distance to the nearest other reference
    sample) describe reference sample ``i`` of ``stations[i]`` in ``shifts[i]``. ``confidence``
    sets the detectors' bounds (:func:`mix_bounds`, :func:`tail_rate_bound`).
    """
    out: dict[str, Baseline] = {}
    for key, (parent, mask) in baseline_cells(stations, shifts, min_count=min_count).items():
        counts = np.bincount(clusters[mask], minlength=k).astype(np.int64)
        prior = np.asarray(out[parent].p) if parent is not None else np.full(k, 1.0 / k)
        t, rate, exceed = ood_threshold(distances[mask], quantile)
        n = int(mask.sum())
        lower, upper = mix_bounds(counts, prior, alpha, confidence)
        out[key] = Baseline(key, parent, n, tuple(int(c) for c in counts),
                            tuple(float(x) for x in smoothed(counts, prior, alpha)),
                            t, rate, exceed, tuple(float(x) for x in lower),
                            tuple(float(x) for x in upper),
                            tail_rate_bound(n, exceed, confidence))
    return out


def resolve(baselines: Collection[str], station: str, shift: str) -> str:
    """The most specific baseline key for an event: station×shift, else station, else global."""
    for key in (station_shift_key(station, shift), station_key(station)):
        if key in baselines:
            return key
    return GLOBAL
