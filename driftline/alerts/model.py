"""The incident record of the failure book (DESIGN.md §5) and its parts.

Every stored record carries ``schema_version``; a reader refuses a version it does not know
rather than guessing. Event times (onset, detection) are the events' own timestamps; ``at``
fields of the timeline and the resolution are wall-clock times of the action.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
SYSTEM = "driftline"  # ``who`` of every action the service takes by itself


class Status(StrEnum):
    open = "open"
    acknowledged = "acknowledged"
    resolved = "resolved"


class Severity(StrEnum):
    """Ordered: ``warning`` < ``major`` < ``critical`` (see :func:`severity_rank`)."""

    warning = "warning"
    major = "major"
    critical = "critical"


SEVERITY_ORDER = (Severity.warning, Severity.major, Severity.critical)


def severity_rank(s: Severity) -> int:
    return SEVERITY_ORDER.index(s)


class RootCause(StrEnum):
    optics = "optics"
    lighting = "lighting"
    fixture = "fixture"
    supplier_lot = "supplier_lot"
    labeling_policy = "labeling_policy"
    data_coverage = "data_coverage"
    threshold = "threshold"
    model = "model"
    other = "other"


def utc(ts: float) -> datetime:
    """POSIX seconds → aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SliceRef(_Model):
    template: str
    dims: dict[str, str]
    slice_id: str


class EpisodeCounts(_Model):
    """Keeps one episode's evidence apart from the detector's earlier ones: while a slice stays
    open the detect stage reports counts and cells since its *first* onset, so the book
    differences consecutive messages (``last``) and sums the episode's own ``counts``, and
    reads the episode's own cells as the alarm's less those when it began (``start_cells``)."""

    last: dict[str, Any] | None = None
    counts: dict[str, Any] | None = None
    slice_n: int | None = None
    cells: list[float] | None = Field(
        None, description="the last message's cell totals [n, x, expected] (persistence)")
    last_cells: dict[str, Any] | None = Field(
        None, description="the last message's cells, as sent (cumulative since the alarm)")
    start_cells: dict[str, Any] | None = Field(
        None, description="the alarm's cells when the episode began (None: the first one)")


class Firing(_Model):
    """One detector of one slice: its latest crossing and whether it is still active."""

    slice_id: str
    detector: str
    statistic: float
    threshold: float
    argmax: dict[str, Any] = Field(default_factory=dict)
    onset: datetime | None = None
    first_detected: datetime
    last_detected: datetime
    crossings: int = 1
    events_at_detection: int | None = Field(None, description="events since onset at alarm")
    active: bool = True
    cleared_at: datetime | None = None
    episode: EpisodeCounts = Field(default_factory=EpisodeCounts)
    episodes: int = Field(1, description="episodes this record stands for (1 while live): "
                          "of a detector's ended firings in a slice the book keeps the first "
                          "(its statistic, onset and detection) and counts the later ones "
                          "here (``last_detected`` and ``cleared_at`` are then the latest's)")


class SliceEvidence(_Model):
    """What one alarmed slice showed since its onset (the input of attribution)."""

    ref: SliceRef
    strength: float = Field(description="share of events moved since onset, noise removed")
    mix_shift: float = Field(0.0, description="the cluster-mix part of strength")
    displaced: float = Field(0.0, description="share of events moved (mix TV or OOD excess)")
    n_since_onset: int = 0
    signature: list[float] = Field(default_factory=list, description="p_obs - p_ref, OOD")
    counts: dict[str, Any] | None = None
    cells: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per detector: its alarm's per-cell counts")
    exemplars: list[dict[str, Any]] = Field(default_factory=list)
    model_versions: dict[str, int] = Field(
        default_factory=dict, description="events per model_version over the slice's whole "
        "life, not since the onset: the model versions it has seen, and how much")
    reference_id: str | None = Field(None, description="the reference the alarm was raised on")
    onset: datetime | None = None
    first_time: datetime | None = Field(None, description="event time of the first crossing")
    last_time: datetime | None = None


class ClusterShift(_Model):
    """A cluster that gained (``delta > 0``) or lost mass since the onset."""

    cluster: int
    p_ref: float
    p_obs: float
    delta: float
    observed: int
    expected: float
    aggressor: bool = False
    description: dict[str, Any] | None = None


class OodEvidence(_Model):
    n: int
    observed: int
    rate: float
    reference_rate: float
    ratio: float | None


class Exemplar(_Model):
    event_id: str
    slice_id: str
    cluster: int | None = None
    distance: float | None = None
    ts: datetime | None = None
    ood: bool | None = None
    reference_exemplars: list[str] = Field(default_factory=list)
    source_partition: int | None = Field(None, description="the event's events-topic partition")
    source_offset: int | None = Field(None, description="the event's offset there")


class Evidence(_Model):
    """The root slice's evidence since onset, with cluster descriptions when known."""

    slice_id: str
    n: int = Field(0, description="events counted since onset")
    missed: int = Field(0, description="events since onset the detect stage could not tell "
                        "from those before it (read into a count bucket begun before the "
                        "onset), left out of n: n + missed is the events since onset")
    truncated: bool = Field(False, description="the counts start after the onset: the detect "
                            "stage's count ring had dropped older events")
    clusters: list[ClusterShift] = Field(default_factory=list)
    ood: OodEvidence | None = None
    exemplars: list[Exemplar] = Field(default_factory=list)
    model_versions: dict[str, int] = Field(
        default_factory=dict, description="events per model_version over the slice's whole "
        "life, not since the onset: the model versions it has seen, and how much")
    signature: list[float] = Field(default_factory=list, description="for recurrence matching")
    reference_id: str | None = Field(None, description="the reference the root's alarm was "
                                     "raised on: cluster ids are that reference's clusters")


class Delay(_Model):
    events: int | None = None
    seconds: float | None = None


class TimelineEntry(_Model):
    at: datetime
    who: str
    action: str
    note: str | None = None


class Resolution(_Model):
    category: RootCause
    note: str | None = None
    who: str
    at: datetime


class RecurrenceLink(_Model):
    incident_id: str
    similarity: float


class Incident(_Model):
    schema_version: int = SCHEMA_VERSION
    id: str
    status: Status = Status.open
    severity: Severity = Severity.warning
    root: SliceRef
    related: list[SliceRef] = Field(default_factory=list)
    detectors: list[Firing] = Field(default_factory=list)
    onset: datetime | None = None
    detected_at: datetime
    delay: Delay = Field(default_factory=Delay)
    evidence: Evidence
    slices: dict[str, SliceEvidence] = Field(
        default_factory=dict, description="per alarmed slice (root and related)")
    baseline_n: dict[str, int] = Field(
        default_factory=dict, description="slice n when it was first looked at, for 'clean'")
    timeline: list[TimelineEntry] = Field(default_factory=list)
    resolution: Resolution | None = None
    resolved_at: datetime | None = None
    auto_resolved: bool = False
    merged_into: str | None = None
    held: bool = Field(False, description="opened by the co-occurrence plan (split off, or a "
                       "new root) and not paged: its changes are not routed until the plan is "
                       "stable behind it or hold_max_s passed (``paged``); on a resolved "
                       "incident, it never paged")
    held_since: datetime | None = Field(
        None, description="event time the hold began (hold_max_s counts from it)")
    stable_from: dict[str, int] = Field(
        default_factory=dict, description="while held: each plan root in it and its events "
                                          "when the plan began to name it (empty: none)")
    recurrence: list[RecurrenceLink] = Field(default_factory=list)
    dropped_slices: dict[str, int] = Field(
        default_factory=dict, description="per template, related slices whose alarms had all "
        "ended that the book dropped (evidence and firings), oldest first, to keep a "
        "long-lived incident bounded (:mod:`driftline.alerts.bounds`)")
    created_at: datetime
    updated_at: datetime
    last_activity: datetime = Field(description="event time of the newest alarm or clear")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"incident schema_version {v} is not {SCHEMA_VERSION}")
        return v

    @property
    def active(self) -> bool:
        return self.status is not Status.resolved

    def dims(self) -> dict[str, set[str]]:
        """Every station/shift/lot value of the root and related slices (list filters)."""
        out: dict[str, set[str]] = {}
        for ref in (self.root, *self.related):
            for k, v in ref.dims.items():
                out.setdefault(k, set()).add(v)
        return out

    def summary(self) -> dict[str, Any]:
        """The small view routed to Alertmanager, Kafka and webhooks."""
        return {
            "schema_version": self.schema_version, "id": self.id, "status": self.status.value,
            "severity": self.severity.value, "root": self.root.model_dump(),
            "related": [r.slice_id for r in self.related],
            "detectors": sorted({f.detector for f in self.detectors}),
            "onset": iso(self.onset), "detected_at": iso(self.detected_at),
            "resolved_at": iso(self.resolved_at), "auto_resolved": self.auto_resolved,
            "category": self.resolution.category.value if self.resolution else None,
            "merged_into": self.merged_into, "held": self.held,
            "recurrence": [r.model_dump() for r in self.recurrence],
        }


def iso(t: datetime | None) -> str | None:
    """RFC 3339 with ``Z``, as the event schema writes times."""
    return None if t is None else t.isoformat().replace("+00:00", "Z")
