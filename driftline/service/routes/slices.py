"""``/api/v1/slices``: current statistics and status per slice, and a slice's timeline."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status

from driftline.alerts.model import utc
from driftline.service.deps import RedisDep, Viewer
from driftline.service.routes import EncodedSlashRoute
from driftline.service.schemas.common import COMMON_ERRORS, QueryTime, errors, time_range
from driftline.service.schemas.slices import (
    DetectorView,
    SliceDetail,
    SliceStatus,
    SliceTimeline,
    SliceView,
    StatPoint,
    TimelinePoint,
)
from driftline.service.slice_data import SliceData, counts_of, detectors_of
from driftline.service.timeline import buckets, replay, shares

router = APIRouter(prefix="/slices", tags=["slices"], responses=COMMON_ERRORS,
                   route_class=EncodedSlashRoute)

SliceId = Annotated[str, Path(max_length=600, description="slice id ('/' sent as %2F)",
                              examples=["station=press-3|shift=night"])]
Dim = Annotated[str | None, Query(min_length=1, max_length=128)]


def _ts(t: datetime | None) -> float | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


@router.get("", response_model=list[SliceView])
def list_slices(
    r: RedisDep, _: Viewer,
    template: Annotated[str | None, Query(max_length=64, examples=["station"])] = None,
    station: Dim = None, shift: Dim = None, lot: Dim = None,
    status_: Annotated[SliceStatus | None, Query(alias="status")] = None,
) -> list[SliceView]:
    """Every slice's current statistic/threshold ratios, OOD ratio and status; alarmed first."""
    want = {d: v for d, v in (("station", station), ("shift", shift), ("lot", lot)) if v}
    out = []
    for sid, doc in SliceData(r).summaries().items():
        if template is not None and doc.get("template") != template:
            continue
        if any(doc["dims"].get(d) != v for d, v in want.items()):
            continue
        view = SliceView.of(sid, doc)
        if status_ is None or view.status == status_:
            out.append(view)
    rank = {"alarm": 0, "elevated": 1, "ok": 2}
    out.sort(key=lambda v: (rank[v.status], -max(v.ratios.values(), default=0.0), v.slice_id))
    return out


def _detectors(state: dict[str, Any] | None) -> list[DetectorView]:
    det = detectors_of(state) if state else None
    if det is None:
        return []
    return [DetectorView(name=name, statistic=s["statistic"], threshold=s["threshold"],
                         ratio=s["ratio"], alarm=s["alarm"], n=s["n"])
            for name, s in sorted(det.status().items())]


def _known(data: SliceData, slice_id: str) -> dict[str, Any]:
    doc = data.summary(slice_id)
    if doc is None or not isinstance(doc.get("dims"), dict):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=(
            f"no slice {slice_id!r} in the detect stage's summary (ids look like "
            "'station=press-3|shift=night'; list them at /api/v1/slices)"))
    return doc


@router.get("/{slice_id}", response_model=SliceDetail, responses=errors(404))
def get_slice(slice_id: SliceId, r: RedisDep, _: Viewer) -> SliceDetail:
    """A slice's status with the exact current statistic and threshold of each detector."""
    data = SliceData(r)
    view = SliceView.of(slice_id, _known(data, slice_id))
    state = data.state(slice_id)
    versions = {str(k): int(v) for k, v in ((state or {}).get("versions") or {}).items()}
    return SliceDetail(**view.model_dump(), detectors=_detectors(state),
                       model_versions=versions, state_found=state is not None)


@router.get("/{slice_id}/timeline", response_model=SliceTimeline, responses=errors(404))
def get_timeline(
    slice_id: SliceId, r: RedisDep, _: Viewer,
    since: Annotated[QueryTime | None, Query(description="event time, inclusive")] = None,
    until: Annotated[QueryTime | None, Query(description="event time, inclusive")] = None,
) -> SliceTimeline:
    """Per event-time bucket: cluster shares vs expected, OOD rate vs reference, and the
    cluster-mix and OOD statistics against their thresholds (bucket-level replay)."""
    time_range(since, until)
    data = SliceData(r)
    _known(data, slice_id)
    state = data.state(slice_id)
    counts = counts_of(state) if state else None
    if state is None or counts is None:
        return SliceTimeline(slice_id=slice_id, bucket_seconds=0.0, truncated=False,
                             current=_detectors(state), points=[])
    lo, hi = _ts(since), _ts(until)
    points = replay(buckets(counts, lo, hi), state["detectors"].get("detectors") or {})
    first = points[0].start if points else lo
    out = []
    for p in points:
        c = p.counts
        obs, exp = shares(c)
        out.append(TimelinePoint(
            start=utc(p.start), end=utc(p.end), n=c.n, cluster_shares=obs, expected_shares=exp,
            ood_rate=round(c.ood / c.n_ood, 6) if c.n_ood else None,
            ood_reference_rate=round(c.ood_expected / c.n_ood, 6) if c.n_ood else None,
            statistics={k: StatPoint(statistic=round(s, 4), threshold=h,
                                     ratio=round(s / h, 4) if h > 0 else 0.0)
                        for k, (s, h) in p.statistics.items()}))
    truncated = first is not None and counts.since(first).truncated
    return SliceTimeline(slice_id=slice_id, bucket_seconds=counts.bucket_seconds,
                         truncated=truncated, current=_detectors(state), points=out)
