"""The root-slice scan over recent events, as the failure book's attribution oracle.

The embed stage keeps the metadata of recent events (slice values, OOD flag, baseline rate) in
the Redis stream ``dl:recent:meta``. :class:`ScanOracle` runs :func:`driftline.core.scan.scan`
over them: its roots are the slices that explain the OOD evidence, and any alarmed slice is
attributed to the root that removes most of its excess (see ``driftline/core/scan.py``).
Cluster-mix changes without OOD evidence are left to the strength-based attribution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from driftline.core.scan import Hit, explained_by, scan
from driftline.schema import parse_slice_id

RECENT_META_KEY = "dl:recent:meta"
DIMS = ("station", "shift", "lot")


class ScanOracle:
    """Roots found by the scan and which root explains a given slice."""

    def __init__(self, events: Sequence[dict[str, Any]], templates: Sequence[str],
                 min_llr: float = 10.0) -> None:
        usable = [e for e in events if e.get("ood") is not None and e.get("ood_p0")]
        self.cols = {d: np.array([str(e[d]) for e in usable]) for d in DIMS}
        self.flags = np.array([bool(e["ood"]) for e in usable], bool)
        self.p0 = np.array([float(e["ood_p0"]) for e in usable], np.float64)
        self.hits: list[Hit] = (scan(self.cols, self.flags, self.p0, templates, min_llr=min_llr)
                                if usable else [])

    @classmethod
    def from_redis(cls, client: Any, templates: Sequence[str], *, key: str = RECENT_META_KEY,
                   count: int = 50_000) -> ScanOracle:
        rows = client.xrevrange(key, count=count)
        return cls([json.loads(f[b"meta"]) for _, f in reversed(rows)], templates)

    def _mask(self, slice_id: str) -> np.ndarray:
        mask = np.ones(self.flags.size, bool)
        for dim, value in parse_slice_id(slice_id).items():
            mask &= self.cols[dim] == value
        return mask

    def root_of(self, slice_id: str) -> Hit | None:
        """The scan root that explains this slice's OOD excess, if any."""
        if not self.hits:
            return None
        i = explained_by(self._mask(slice_id), self.flags, self.p0, self.hits)
        return None if i is None else self.hits[i]
