"""Reference baselines: which cluster mix and OOD rate an event should be judged against.

A baseline exists for the whole reference (``global``), for each station, and for each
station×shift, when it has at least ``min_count`` reference samples; otherwise the event falls
back to its parent (station×shift → station → global). Keys follow the slice-id convention of
:func:`driftline.schema.slice_id`: ``global``, ``station=s1``, ``station=s1|shift=night``.

Cluster distributions are smoothed toward the parent's distribution (toward uniform for
``global``) with ``alpha`` pseudo-counts per cluster, so no cluster has ``p = 0`` — the
cluster-mix CUSUM's increment ``ln((1-ε) + ε/p_k)`` needs ``p_k > 0`` — and a station that
saw a cluster rarely inherits the fleet's idea of how rare it is rather than a guess.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

GLOBAL = "global"


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


@dataclass(frozen=True)
class Baseline:
    """The reference an event is judged against."""

    key: str
    parent: str | None
    n: int
    counts: tuple[int, ...]
    p: tuple[float, ...]
    ood_threshold: float
    ood_rate: float
    ood_exceed: int


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
    quantile: float = 0.99,
) -> dict[str, Baseline]:
    """Global, per-station and per-station×shift baselines with at least ``min_count`` samples.

    ``clusters[i]`` and ``distances[i]`` (leave-one-out distance to the nearest other reference
    sample) describe reference sample ``i`` of ``stations[i]`` in ``shifts[i]``.
    """
    out: dict[str, Baseline] = {}
    for key, (parent, mask) in baseline_cells(stations, shifts, min_count=min_count).items():
        counts = np.bincount(clusters[mask], minlength=k).astype(np.int64)
        prior = np.asarray(out[parent].p) if parent is not None else np.full(k, 1.0 / k)
        t, rate, exceed = ood_threshold(distances[mask], quantile)
        out[key] = Baseline(key, parent, int(mask.sum()), tuple(int(c) for c in counts),
                            tuple(float(x) for x in smoothed(counts, prior, alpha)),
                            t, rate, exceed)
    return out


def resolve(baselines: Collection[str], station: str, shift: str) -> str:
    """The most specific baseline key for an event: station×shift, else station, else global."""
    for key in (station_shift_key(station, shift), station_key(station)):
        if key in baselines:
            return key
    return GLOBAL
