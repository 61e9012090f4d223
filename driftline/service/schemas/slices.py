"""Slice views: current statistics and status, detector details, timeline points."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from driftline.alerts.model import utc

SliceStatus = Literal["alarm", "elevated", "ok"]
ELEVATED_RATIO = 0.5


class SliceView(BaseModel):
    slice_id: str = Field(examples=["station=press-3|shift=night"])
    template: str = Field(examples=["station+shift"])
    dims: dict[str, str]
    n: int = Field(description="events seen by the slice's detectors")
    last_time: datetime | None = Field(description="event time of the newest event")
    ratios: dict[str, float] = Field(description="statistic / threshold per detector")
    ood_ratio: float | None = Field(description="OOD rate over the last hour / reference rate")
    open: list[str] = Field(description="detectors whose alarm is open")
    status: SliceStatus = Field(description="alarm: an open detector; elevated: a ratio of "
                                            f"{ELEVATED_RATIO} or more; else ok")

    @classmethod
    def of(cls, slice_id: str, doc: dict[str, Any]) -> SliceView:
        ratios = {str(k): float(v) for k, v in (doc.get("ratios") or {}).items()
                  if isinstance(v, int | float)}
        open_ = [str(d) for d in doc.get("open") or []]
        status: SliceStatus = "alarm" if open_ else (
            "elevated" if max(ratios.values(), default=0.0) >= ELEVATED_RATIO else "ok")
        last = doc.get("last_time")
        ood = doc.get("ood_ratio")
        return cls(slice_id=slice_id, template=str(doc.get("template", "")),
                   dims={str(k): str(v) for k, v in doc["dims"].items()},
                   n=int(doc.get("n") or 0),
                   last_time=utc(float(last)) if isinstance(last, int | float) else None,
                   ratios=ratios, ood_ratio=float(ood) if isinstance(ood, int | float) else None,
                   open=open_, status=status)


class DetectorView(BaseModel):
    name: str = Field(examples=["cluster_mix"])
    statistic: float
    threshold: float
    ratio: float
    alarm: bool
    n: int = Field(description="events since the detector's last restart")


class SliceDetail(SliceView):
    detectors: list[DetectorView] = Field(description="exact current values from the state")
    model_versions: dict[str, int] = Field(description=(
        "events per model_version over the slice's whole life"))
    state_found: bool = Field(description="false if no detect worker has checkpointed it yet")


class StatPoint(BaseModel):
    statistic: float
    threshold: float
    ratio: float


class TimelinePoint(BaseModel):
    start: datetime
    end: datetime
    n: int
    cluster_shares: list[float]
    expected_shares: list[float] = Field(description="from the events' own baselines")
    ood_rate: float | None
    ood_reference_rate: float | None
    statistics: dict[str, StatPoint] = Field(
        description="bucket-level replay of the cluster-mix and OOD CUSUMs (see docs)")


class SliceTimeline(BaseModel):
    slice_id: str
    bucket_seconds: float
    truncated: bool = Field(description="older buckets were already folded away")
    current: list[DetectorView]
    points: list[TimelinePoint]
