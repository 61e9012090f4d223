"""A slice's timeline from its event-time count buckets (pure: numpy only).

Per bucket: cluster shares observed vs expected (the events' own baselines), OOD rate vs the
reference rate, and a **bucket-level replay** of the cluster-mix and OOD-rate CUSUM banks: the
same alternatives and thresholds as the slice's detectors, with one Page step per bucket,

    S_b = max(0, S_{b-1} + LLR_b),   LLR_b = Σ_events llr(event) with the bucket's mean baseline,

started at zero at the first bucket shown. Within a bucket the per-event clipping at zero is
not applied, so the replay is a bucket-resolution view of the statistic, not the detector's own
trajectory (whose current value is given separately, exactly, from the detector's state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from driftline.core.bernoulli import bernoulli_table
from driftline.core.counts import Counts, SliceCounts
from driftline.core.mix import mix_tables


@dataclass(frozen=True)
class Bucket:
    start: float
    end: float
    counts: Counts
    statistics: dict[str, tuple[float, float]] = field(default_factory=dict)


def buckets(counts: SliceCounts, since: float | None = None,
            until: float | None = None) -> list[Bucket]:
    """The non-empty buckets whose start lies in ``[since, until]`` (event time, seconds)."""
    w = counts.bucket_seconds
    keys = counts.bucket_keys()
    out = []
    for k in keys:
        start = k * w
        if (since is not None and start + w <= since) or (until is not None and start > until):
            continue
        c = _minus(counts.since(start), counts.since(start + w))
        if c.n or c.n_ood:
            out.append(Bucket(start, start + w, c))
    return out


def _minus(a: Counts, b: Counts) -> Counts:
    return Counts(n=a.n - b.n, clusters=[x - y for x, y in zip(a.clusters, b.clusters,
                                                                 strict=True)],
                  expected=[x - y for x, y in zip(a.expected, b.expected, strict=True)],
                  n_ood=a.n_ood - b.n_ood, ood=a.ood - b.ood,
                  ood_expected=a.ood_expected - b.ood_expected)


def _mix_llr(c: Counts, cfg: Mapping[str, Any]) -> np.ndarray | None:
    if c.n <= 0:
        return None
    e = np.maximum(np.asarray(c.expected, np.float64), 0.0)
    if not e.sum() > 0:  # none, or not a number (mix_tables refuses it)
        return None
    base, diff = mix_tables(e / e.sum(), cfg["epsilons"], cfg["fractions"])
    o = np.asarray(c.clusters, np.float64)
    inc: np.ndarray = c.n * base + o[:, None] * diff
    return inc.ravel()


def _ood_llr(c: Counts, cfg: Mapping[str, Any]) -> np.ndarray | None:
    if c.n_ood <= 0 or not math.isfinite(c.ood_expected):  # bernoulli_table refuses NaN
        return None
    table = bernoulli_table(c.ood_expected / c.n_ood, [tuple(a) for a in cfg["alternatives"]])
    inc: np.ndarray = (c.n_ood - c.ood) * table[0] + c.ood * table[1]
    return inc


_REPLAYS = {"cluster_mix": _mix_llr, "ood_rate": _ood_llr}


def replay(points: list[Bucket], detectors: Mapping[str, Any]) -> list[Bucket]:
    """Add ``(statistic, threshold)`` per replayable detector to every bucket.

    ``detectors`` is the ``detectors`` part of a :class:`~driftline.core.slices.SliceDetectors`
    snapshot (each with ``config`` and ``threshold``).
    """
    out = [Bucket(p.start, p.end, p.counts, dict(p.statistics)) for p in points]
    for name, step in _REPLAYS.items():
        snap = detectors.get(name)
        if not snap:
            continue
        h = float(snap["threshold"])
        s: np.ndarray | None = None
        for p in out:
            inc = step(p.counts, snap["config"])
            if inc is not None:
                s = np.maximum(0.0, inc if s is None else s + inc)
            top = float(s.max()) if s is not None else 0.0
            p.statistics[name] = (top if math.isfinite(top) else 0.0, h)
    return out


def shares(c: Counts) -> tuple[list[float], list[float]]:
    """Observed and expected cluster shares of a bucket."""
    o, e = np.asarray(c.clusters, np.float64), np.asarray(c.expected, np.float64)
    return ((o / o.sum()).round(6).tolist() if o.sum() > 0 else [0.0] * o.size,
            (e / e.sum()).round(6).tolist() if e.sum() > 0 else [0.0] * e.size)


def window(counts: SliceCounts, since: float | None = None,
           until: float | None = None) -> Counts:
    """Totals of the buckets :func:`buckets` selects (bucket resolution at both ends)."""
    if since is None and until is None:
        return counts.since(None)
    total = Counts(0, [0] * counts.n_clusters, [0.0] * counts.n_clusters, 0, 0, 0.0)
    for b in buckets(counts, since, until):
        total = _plus(total, b.counts)
    return total


def _plus(a: Counts, b: Counts) -> Counts:
    return Counts(n=a.n + b.n, clusters=[x + y for x, y in zip(a.clusters, b.clusters,
                                                                 strict=True)],
                  expected=[x + y for x, y in zip(a.expected, b.expected, strict=True)],
                  n_ood=a.n_ood + b.n_ood, ood=a.ood + b.ood,
                  ood_expected=a.ood_expected + b.ood_expected)
