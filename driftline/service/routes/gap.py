"""``/api/v1/gap``: domain gap between the slices of one dimension over an event-time range.

For each value of the dimension (each station, shift or lot) the cluster counts of its slice
over the range are summed from the detect stage's count buckets — from the slice of that
one-dimension template if it is monitored, else by merging the slices of the smallest
template containing the dimension (``station+shift`` slices of one shift add up to the shift:
every event is in exactly one). The matrix holds the Jensen–Shannon divergence between the
smoothed cluster mixes and the difference of OOD rates: station-to-station (or line-to-line)
transfer validation in the reference's cluster vocabulary.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from driftline.core.counts import SliceCounts
from driftline.service.deps import RedisDep, Viewer
from driftline.service.schemas.analysis import GapMatrix, GapSlice
from driftline.service.schemas.common import COMMON_ERRORS, QueryTime, time_range
from driftline.service.slice_data import SliceData, counts_of
from driftline.service.statistics import js_matrix, smoothed
from driftline.service.timeline import window

router = APIRouter(prefix="/gap", tags=["gap"], responses=COMMON_ERRORS)


def _ts(t: datetime | None) -> float | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _groups(data: SliceData, dimension: str) -> dict[str, list[str]]:
    """Value → slice ids to merge (see the module docstring)."""
    by_template: dict[str, dict[str, list[str]]] = {}
    for sid, doc in data.summaries().items():
        dims = doc["dims"]
        if dimension in dims:
            tpl = "+".join(sorted(dims))
            by_template.setdefault(tpl, {}).setdefault(str(dims[dimension]), []).append(sid)
    if not by_template:
        return {}
    best = min(by_template, key=lambda t: (t.count("+"), t))
    return by_template[best]


@router.get("", response_model=GapMatrix)
def domain_gap(
    r: RedisDep, _: Viewer,
    dimension: Annotated[Literal["station", "shift", "lot"], Query()] = "station",
    since: Annotated[QueryTime | None, Query(description="event time")] = None,
    until: Annotated[QueryTime | None, Query(description="event time")] = None,
    values: Annotated[list[str] | None, Query(max_length=100,
                                              description="only these values")] = None,
    alpha: Annotated[float, Query(gt=0.0, le=10.0, description="add-alpha smoothing")] = 0.5,
    min_events: Annotated[int, Query(ge=0, le=1_000_000)] = 100,
    max_values: Annotated[int, Query(ge=2, le=200)] = 50,
) -> GapMatrix:
    """Pairwise JS divergence of cluster mixes and OOD-rate differences between the values
    of ``dimension`` (most events first, at most ``max_values``)."""
    time_range(since, until)
    data = SliceData(r)
    groups = _groups(data, dimension)
    if values:
        groups = {v: s for v, s in groups.items() if v in set(values)}
    states = data.states([sid for sids in groups.values() for sid in sids])
    lo, hi = _ts(since), _ts(until)
    rows: list[GapSlice] = []
    mixes = []
    for value, sids in groups.items():
        merged: SliceCounts | None = None
        used = []
        for sid in sorted(sids):
            counts = counts_of(states[sid]) if sid in states else None
            if counts is None:
                continue
            try:
                merged = counts if merged is None else merged.merge(counts)
            except ValueError:  # another reference's K or bucket width: not comparable
                continue
            used.append(sid)
        if merged is None:
            continue
        c = window(merged, lo, hi)
        mix = smoothed(c.clusters, alpha)
        rows.append(GapSlice(value=value, slices=used, n=c.n,
                             ood_rate=round(c.ood / c.n_ood, 6) if c.n_ood else None,
                             cluster_shares=mix.round(6).tolist()))
        mixes.append(mix)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].n, rows[i].value))[:max_values]
    # Different references give different K; compare only mixes of the most common length.
    lengths = [mixes[i].size for i in order]
    k = max(set(lengths), key=lengths.count) if lengths else 0
    order = [i for i in order if mixes[i].size == k]
    rows, mixes = [rows[i] for i in order], [mixes[i] for i in order]
    ood = [[None if a.ood_rate is None or b.ood_rate is None else round(a.ood_rate - b.ood_rate, 6)
            for b in rows] for a in rows]
    return GapMatrix(dimension=dimension, since=since, until=until, alpha=alpha,
                     values=[s.value for s in rows], slices=rows, js_divergence=js_matrix(mixes),
                     ood_rate_difference=ood,
                     low_count=[s.value for s in rows if s.n < min_events])
