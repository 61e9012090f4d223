"""Reference views: list rows, manifest summary, activation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

ACTIVATION_NOTE = ("stored in Redis (dl:reference:active); running stages keep the reference "
                   "they loaded and use the activated one from their next restart")


class ReferenceRow(BaseModel):
    reference_id: str = Field(examples=["3f9c2a7b1d4e8f60"])
    name: str = Field(description="directory name")
    path: str
    created_at: str | None
    events: int | None = Field(description="reference events it was built from")
    clusters: int | None
    configured: bool = Field(description="it is DRIFTLINE_REFERENCE_DIR (what workers run when "
                                         "none is activated, or the activated one is unusable)")
    activated: bool = Field(description="it is the reference activated through the API")

    @classmethod
    def of(cls, path: str, manifest: dict[str, Any], configured: bool,
           activated: bool) -> ReferenceRow:
        return cls(reference_id=str(manifest["reference_id"]), name=path.rsplit("/", 1)[-1],
                   path=path, created_at=manifest.get("created_at"),
                   events=(manifest.get("source") or {}).get("events"),
                   clusters=(manifest.get("clusters") or {}).get("k"),
                   configured=configured, activated=activated)


class ClusterRow(BaseModel):
    id: int
    size: int | None
    share: float | None
    median_distance_to_centroid: float | None
    exemplars: list[str]
    performance: dict[str, Any] | None


class BaselineRow(BaseModel):
    key: str
    parent: str | None
    n: int | None
    ood_threshold: float | None
    ood_rate: float | None = Field(description="stated exceedance rate (k+1)/(n+1): evidence")
    ood_rate_bound: float | None = Field(
        None, description="the OOD detector's pre-change rate: the upper confidence bound of "
                          "the true rate (for references built before it was stored, computed "
                          "from the exceedance count, as the detect stage does)")


class ReferenceDetail(ReferenceRow):
    driftline_version: str | None
    source: dict[str, Any]
    embedding: dict[str, Any] = Field(description="input and projected dimensions, PCA, model")
    cluster_items: list[ClusterRow]
    baselines: list[BaselineRow]
    aggressors: list[dict[str, Any]] = Field(description="clusters with more errors or loss")


class ActivationRequest(BaseModel):
    model_config = {"extra": "forbid",
                    "json_schema_extra": {"examples": [{"note": "rebuilt after the lens swap"}]}}

    note: str | None = Field(None, max_length=2000)
    name: str | None = Field(None, max_length=255, description=(
        "the directory (a listed row's name) when several hold this reference id, such as a "
        "backup copy; without it, the activated or configured one of them"))


class ActivationView(BaseModel):
    reference_id: str
    path: str
    activated_by: str
    activated_at: str
    note: str | None
    effect: str = Field(default=ACTIVATION_NOTE)
