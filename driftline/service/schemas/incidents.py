"""Incident requests (acknowledge, resolve, annotate) and views (list item, detail, evidence)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from driftline.alerts.cooccurrence import CooccurrencePolicy, read_cells
from driftline.alerts.misfit import BaselineMisfit
from driftline.alerts.model import (
    Delay,
    Evidence,
    Exemplar,
    Firing,
    Incident,
    Resolution,
    RootCause,
    Severity,
    SliceEvidence,
    SliceRef,
    Status,
    TimelineEntry,
)
from driftline.alerts.pages import IncidentRow

NOTE_MAX = 2000


# --- requests --------------------------------------------------------------------------------
class AcknowledgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"note": "looking at press-3's camera"}]})

    note: str | None = Field(None, max_length=NOTE_MAX, description="why, or what happens next")


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"category": "optics", "note": "lens cleaned, images sharp again"}]})

    category: RootCause = Field(description="root-cause category")
    note: str | None = Field(None, max_length=NOTE_MAX)


class AnnotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"note": "fixture looked loose on the night shift"}]})

    note: str = Field(min_length=1, max_length=NOTE_MAX)


# --- responses -------------------------------------------------------------------------------
class IncidentSummary(BaseModel):
    """One row of the incident list."""

    id: str
    status: Status
    severity: Severity
    root: SliceRef
    related: list[str] = Field(description="slice ids of the related alarmed slices")
    detectors: list[str]
    onset: datetime | None
    detected_at: datetime
    resolved_at: datetime | None
    category: RootCause | None
    auto_resolved: bool
    merged_into: str | None
    held: bool = Field(False, description="opened by the co-occurrence attribution (split "
                       "off, or a new root) and not paged: it pages once the attribution "
                       "stood behind it for DRIFTLINE_INCIDENT_STABLE_EVENTS events, or after "
                       "DRIFTLINE_INCIDENT_HOLD_MAX_S; on a resolved incident, it never paged")
    recurrence: list[str] = Field(description="ids of past incidents this one matches")
    link: str

    @classmethod
    def of(cls, inc: Incident | IncidentRow, base_url: str) -> IncidentSummary:
        return cls(id=inc.id, status=inc.status, severity=inc.severity, root=inc.root,
                   related=[r.slice_id for r in inc.related],
                   detectors=sorted({f.detector for f in inc.detectors}), onset=inc.onset,
                   detected_at=inc.detected_at, resolved_at=inc.resolved_at,
                   category=inc.resolution.category if inc.resolution else None,
                   auto_resolved=inc.auto_resolved, merged_into=inc.merged_into,
                   held=inc.held, recurrence=[r.incident_id for r in inc.recurrence],
                   link=incident_link(base_url, inc.id))


class IncidentPage(BaseModel):
    items: list[IncidentSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; "
                                                "null on the last page")


class IncidentDetail(IncidentSummary):
    """The whole incident except the per-slice raw counts (see ``/evidence``)."""

    related_slices: list[SliceRef]
    firings: list[Firing]
    delay: Delay
    evidence: Evidence
    timeline: list[TimelineEntry]
    resolution: Resolution | None
    recurrence_links: list[RecurrenceLinkView]
    dropped_slices: dict[str, int] = Field(
        default_factory=dict, description="per template, related slices whose alarms had all "
        "ended that a long-lived incident no longer holds (it keeps those that ended most "
        "recently); a firing's ``episodes`` counts its detector's ended episodes in its slice")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def build(cls, inc: Incident, base_url: str) -> IncidentDetail:
        base = IncidentSummary.of(inc, base_url).model_dump()
        return cls(**base, related_slices=inc.related, firings=inc.detectors, delay=inc.delay,
                   evidence=inc.evidence, timeline=inc.timeline, resolution=inc.resolution,
                   recurrence_links=[RecurrenceLinkView(
                       incident_id=r.incident_id, similarity=r.similarity,
                       link=incident_link(base_url, r.incident_id)) for r in inc.recurrence],
                   dropped_slices=inc.dropped_slices,
                   created_at=inc.created_at, updated_at=inc.updated_at)


class RecurrenceLinkView(BaseModel):
    incident_id: str
    similarity: float = Field(description="cosine of the two incidents' evidence signatures")
    link: str


class AffectedCell(BaseModel):
    station: str
    shift: str
    lot: str
    events: int = Field(description="the alarm's events in this cell since it was raised")
    excess: float = Field(description="events moved beyond the reference (OOD hits or "
                                      "watched-cluster events)")


class CellsView(BaseModel):
    """Where in the slice the change is: its alarm's cells (station × shift × lot) clearly
    above their reference, as the book's co-occurrence attribution reads them."""

    events: int = Field(description="events the alarm's cells counted since it was raised")
    pooled: int = Field(description="of those, events beyond the per-alarm cell bound")
    precision: float = Field(description="share of the events in affected cells")
    affected: list[AffectedCell] = Field(description="largest excess first")

    @classmethod
    def of(cls, ev: SliceEvidence) -> CellsView | None:
        sc = read_cells(ev, CooccurrencePolicy(min_events=1))
        if sc is None:
            return None
        return cls(events=sum(sc.n.values()) + sc.pooled, pooled=sc.pooled,
                   precision=sc.precision, affected=[
                       AffectedCell(station=c[0], shift=c[1], lot=c[2], events=sc.n[c],
                                    excess=x)
                       for c, x in sorted(sc.affected.items(), key=lambda kv: -kv[1])])


class BaselineMisfitView(BaseModel):
    """The alarmed slice's cell has no baseline of its own, and its reference events do not
    fit the one it is judged against: it can alarm on unchanged data."""

    cell: str = Field(examples=["station=s2"])
    reference_events: int = Field(description="the cell's events in the reference")
    judged_against: str = Field(description="the baseline its events are judged against",
                                examples=["global"])
    p_value: float = Field(description="G-test of the cell's reference cluster counts "
                                       "against that baseline's mix (below 0.001)")
    hint: str

    @classmethod
    def of(cls, found: BaselineMisfit | None) -> BaselineMisfitView | None:
        if found is None:
            return None
        return cls(cell=found.cell, reference_events=found.reference_events,
                   judged_against=found.judged_against, p_value=found.p_value,
                   hint=found.hint)


class SliceEffect(BaseModel):
    """How strongly one alarmed slice shows the change since its onset."""

    slice_id: str
    template: str
    root: bool
    strength: float = Field(description="per-event effect, sqrt(nats/event)")
    displaced: float = Field(description="share of events moved")
    n_since_onset: int
    onset: datetime | None
    last_time: datetime | None
    model_versions: dict[str, int] = Field(description=(
        "events per model_version over the slice's whole life, not since the onset"))
    cells: CellsView | None = Field(None, description="none for alarms without cells")
    baseline_misfit: BaselineMisfitView | None = Field(None, description=(
        "set when the slice's cell (a station slice's station, a station+shift slice's own) "
        "falls back to a parent baseline its reference events do not fit, in the reference "
        "the API runs on when the alarm was raised on it: an alarm there may be a gap in "
        "the reference, not drift"))


class EvidenceView(BaseModel):
    incident_id: str
    evidence: Evidence
    slices: list[SliceEffect] = Field(description="root first, then by strength")


class ExemplarView(BaseModel):
    exemplar: Exemplar
    in_recent_buffer: bool = Field(description="its embedding is still in the recent buffer "
                                               "(similarity search and label-set distances)")


class RecurrenceView(BaseModel):
    """A past incident this one matches; ``available`` is false once retention removed it."""

    incident_id: str
    similarity: float
    available: bool
    root: SliceRef | None = None
    category: RootCause | None = None
    resolved_at: datetime | None = None
    link: str


def incident_link(base_url: str, incident_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v1/incidents/{incident_id}"


IncidentDetail.model_rebuild()
