"""Mergeable per-slice counts in event-time buckets: observed vs expected mix and OOD rate.

An incident needs "what changed since the onset": observed cluster counts against the counts
the events' own baselines expected, and the OOD rate against its reference. The onset is only
known when a detector alarms, so counts are kept per event-time bucket and summed from the
onset's bucket on demand. Buckets add, so counts from several workers (or a replay) merge by
addition; a bucket holds, in one float vector (exact for integers below 2**53)::

    [n, n_ood, ood_hits, ood_expected, counts[0..K), expected[0..K)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from driftline.core.cusum import FloatArray

_HEAD = 4


@dataclass(frozen=True)
class Counts:
    """Totals over a time range; ``truncated`` if older buckets had already been dropped."""

    n: int
    clusters: list[int]
    expected: list[float]
    n_ood: int
    ood: int
    ood_expected: float
    truncated: bool = False


class SliceCounts:
    """Event-time bucketed counts for one slice; ``merge`` adds another worker's counts.

    >>> import numpy as np
    >>> p = np.array([0.5, 0.5])
    >>> a, b = SliceCounts(2, bucket_seconds=60.0), SliceCounts(2, bucket_seconds=60.0)
    >>> a.update(0, p, ood=False, ood_p0=0.01, time=10.0)
    >>> b.update(1, p, ood=True, ood_p0=0.01, time=70.0)
    >>> a.merge(b).since(60.0).clusters
    [0, 1]
    """

    def __init__(self, n_clusters: int, bucket_seconds: float = 300.0, max_buckets: int = 48):
        if bucket_seconds <= 0.0 or max_buckets < 1 or n_clusters < 1:
            raise ValueError("need bucket_seconds > 0, max_buckets >= 1, n_clusters >= 1")
        self.n_clusters = int(n_clusters)
        self.bucket_seconds = float(bucket_seconds)
        self.max_buckets = int(max_buckets)
        self._buckets: dict[int, FloatArray] = {}
        self._dropped: FloatArray = np.zeros(_HEAD + 2 * self.n_clusters)
        self._dropped_until: int | None = None

    def _bucket(self, time: float) -> FloatArray:
        key = math.floor(time / self.bucket_seconds)
        row = self._buckets.get(key)
        if row is None:
            row = self._buckets[key] = np.zeros(_HEAD + 2 * self.n_clusters)
        return row

    def _prune(self) -> None:
        while len(self._buckets) > self.max_buckets:
            oldest = min(self._buckets)
            self._dropped += self._buckets.pop(oldest)
            self._dropped_until = max(oldest, self._dropped_until or oldest)

    def update(
        self,
        cluster: int | None,
        baseline: FloatArray | None,
        *,
        ood: bool | None,
        ood_p0: float | None,
        time: float,
    ) -> None:
        """Count one event at event ``time`` (seconds); ``None`` fields are not counted."""
        row = self._bucket(time)
        if cluster is not None and baseline is not None:
            row[0] += 1.0
            row[_HEAD + cluster] += 1.0
            row[_HEAD + self.n_clusters :] += baseline
        if ood is not None and ood_p0 is not None:
            row[1] += 1.0
            row[2] += float(ood)
            row[3] += ood_p0
        self._prune()

    def since(self, time: float | None) -> Counts:
        """Totals of every bucket from ``time``'s bucket on (``None``: everything ever seen)."""
        total = np.zeros_like(self._dropped)
        truncated = False
        if time is None:
            total += self._dropped
            keys = list(self._buckets)
        else:
            first = math.floor(time / self.bucket_seconds)
            keys = [k for k in self._buckets if k >= first]
            truncated = self._dropped_until is not None and first <= self._dropped_until
        for k in keys:
            total += self._buckets[k]
        k = self.n_clusters
        return Counts(
            n=int(total[0]),
            clusters=[int(c) for c in total[_HEAD : _HEAD + k]],
            expected=total[_HEAD + k :].tolist(),
            n_ood=int(total[1]),
            ood=int(total[2]),
            ood_expected=float(total[3]),
            truncated=truncated,
        )

    def merge(self, other: SliceCounts) -> SliceCounts:
        """Add ``other``'s counts into this object (same K and bucket width); returns self."""
        if (other.n_clusters, other.bucket_seconds) != (self.n_clusters, self.bucket_seconds):
            raise ValueError("can only merge counts with the same clusters and bucket width")
        for key, row in other._buckets.items():
            mine = self._buckets.get(key)
            if mine is None:
                self._buckets[key] = row.copy()
            else:
                mine += row
        self._dropped += other._dropped
        if other._dropped_until is not None:
            self._dropped_until = max(other._dropped_until, self._dropped_until or -(2**62))
        self._prune()
        return self

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "n_clusters": self.n_clusters,
            "bucket_seconds": self.bucket_seconds,
            "max_buckets": self.max_buckets,
            "buckets": [[k, row.tolist()] for k, row in sorted(self._buckets.items())],
            "dropped": self._dropped.tolist(),
            "dropped_until": self._dropped_until,
        }

    @classmethod
    def restore(cls, snap: dict[str, Any]) -> SliceCounts:
        """Rebuild from :meth:`snapshot` output."""
        obj = cls(snap["n_clusters"], snap["bucket_seconds"], snap["max_buckets"])
        obj._buckets = {int(k): np.asarray(row, dtype=np.float64) for k, row in snap["buckets"]}
        obj._dropped = np.asarray(snap["dropped"], dtype=np.float64)
        obj._dropped_until = snap["dropped_until"]
        return obj
