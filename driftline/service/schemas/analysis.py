"""Views of the analyses: similar samples, domain gap, model-version comparison."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


# --- similar samples -------------------------------------------------------------------------
class RecentNeighbour(BaseModel):
    event_id: str
    distance: float = Field(description="Euclidean between unit vectors, in [0, 2]")
    ts: datetime | None
    station: str | None
    shift: str | None
    lot: str | None
    model_version: str | None
    cluster: int | None
    pred: str | None
    score: float | None
    label: str | None


class ReferenceNeighbour(BaseModel):
    event_id: str
    distance: float
    cluster: int | None


class SimilarQuery(BaseModel):
    kind: Literal["event", "incident"]
    id: str
    event_ids: list[str] = Field(description="the query embeddings (an incident's exemplars "
                                             "that are still in the recent buffer)")


class SimilarResult(BaseModel):
    query: SimilarQuery
    space: Literal["reference", "raw"] = Field(
        description="reference: the active reference's projected space; raw: no reference "
                    "is loaded, unit raw embeddings (no reference neighbours)")
    buffer_events: int = Field(description="events in the recent buffer searched")
    recent: list[RecentNeighbour]
    reference: list[ReferenceNeighbour]


# --- domain gap ------------------------------------------------------------------------------
class GapSlice(BaseModel):
    value: str
    slices: list[str] = Field(description="slices merged for this value")
    n: int
    ood_rate: float | None
    cluster_shares: list[float] = Field(description="smoothed (add-alpha) cluster shares")


class GapMatrix(BaseModel):
    dimension: Literal["station", "shift", "lot"]
    since: datetime | None
    until: datetime | None
    alpha: float
    values: list[str]
    slices: list[GapSlice]
    js_divergence: list[list[float]] = Field(
        description="Jensen-Shannon divergence (bits, 0..1) between smoothed cluster mixes")
    ood_rate_difference: list[list[float | None]] = Field(
        description="row's OOD rate minus column's")
    low_count: list[str] = Field(description="values with fewer than min_events events")


# --- model versions --------------------------------------------------------------------------
class SignificanceTest(BaseModel):
    test: str = Field(examples=["chi2", "fisher", "mannwhitneyu"])
    statistic: float | None
    p_value: float
    p_adjusted: float = Field(description="Holm-adjusted over every test of the comparison")
    significant: bool


class VersionSide(BaseModel):
    n: int
    prediction_mix: dict[str, float]
    mean_confidence: float | None
    labelled: int
    error_rate: float | None


class ClusterComparison(BaseModel):
    cluster: int | None = Field(description="reference cluster; null for unassigned events")
    a: VersionSide
    b: VersionSide
    prediction_mix: SignificanceTest | None
    confidence: SignificanceTest | None
    error_rate: SignificanceTest | None


class VersionComparison(BaseModel):
    version_a: str
    version_b: str
    alpha: float
    events: dict[str, int] = Field(description="events of each version in the recent buffer "
                                   "embedded on the API's reference (those compared)")
    other_reference: dict[str, int] = Field(
        default_factory=dict, description="events of each version in the recent buffer left "
        "out: embedded on another reference (before an activation), so their clusters are "
        "that reference's. After a model upgrade the old version's events are all here: "
        "compare the versions per cluster before activating the new model's reference")
    clusters: list[ClusterComparison]
    significant: list[str] = Field(description="'cluster <k>: <what>' for every significant "
                                               "difference")
