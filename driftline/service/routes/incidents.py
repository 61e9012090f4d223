"""``/api/v1/incidents``: list, detail, evidence, exemplars, label set, recurrence, lifecycle.

Reads need a viewer token; acknowledge, resolve and annotate need operator, and each is
recorded in the incident's timeline under the caller's token name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, HTTPException, Path, Query, Response, status
from pydantic import BaseModel

from driftline.alerts.book import IncidentNotFound
from driftline.alerts.labelset import label_set_jsonl
from driftline.alerts.model import Incident, Severity, Status
from driftline.service.deps import BookDep, ContextDep, Operator, SettingsDep, Viewer
from driftline.service.routes import EncodedSlashRoute
from driftline.service.schemas.common import COMMON_ERRORS, QueryTime, errors, time_range
from driftline.service.schemas.incidents import (
    AcknowledgeRequest,
    AnnotateRequest,
    BaselineMisfitView,
    CellsView,
    EvidenceView,
    ExemplarView,
    IncidentDetail,
    IncidentPage,
    IncidentSummary,
    RecurrenceView,
    ResolveRequest,
    SliceEffect,
    incident_link,
)
from driftline.service.thumbnails import ThumbnailUnavailable

router = APIRouter(prefix="/incidents", tags=["incidents"], responses=COMMON_ERRORS,
                   route_class=EncodedSlashRoute)

IncidentId = Annotated[str, Path(max_length=64, description="incident id",
                                 examples=["DL-000001"])]
EventId = Annotated[str, Path(max_length=200, description="event id ('/' sent as %2F)")]
Dim = Annotated[str | None, Query(min_length=1, max_length=128)]
CURSOR_PATTERN = r"^-?[0-9]{1,12}(\.[0-9]{1,9})?:[A-Za-z0-9_-]{1,64}$"
JSONL = "application/jsonl"


def _utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _json(model: BaseModel, code: int = 200) -> Response:
    """Serialise an already validated response model once: FastAPI would dump, validate and
    dump it again (a third of a list request's CPU). ``response_model`` still documents it."""
    return Response(model.model_dump_json(), status_code=code, media_type="application/json")


@router.get("", response_model=IncidentPage)
def list_incidents(
    book: BookDep, settings: SettingsDep, _: Viewer,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    severity: Severity | None = None, station: Dim = None, shift: Dim = None, lot: Dim = None,
    since: Annotated[QueryTime | None, Query(description="detected at or after")] = None,
    until: Annotated[QueryTime | None, Query(description="detected at or before")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description=(
        "the next_cursor of the previous page"), examples=["1770012150.0:DL-000042"])] = None,
) -> Response:
    """Incidents, newest detection first, filtered; follow ``next_cursor`` for more."""
    time_range(since, until)
    page = book.list(light=True, status=status_, severity=severity, station=station,
                     shift=shift, lot=lot, since=_utc(since), until=_utc(until), limit=limit,
                     cursor=cursor)
    return _json(IncidentPage(items=[IncidentSummary.of(i, settings.public_url)
                                     for i in page.items], next_cursor=page.next_cursor))


@router.get("/{incident_id}", response_model=IncidentDetail, responses=errors(404))
def get_incident(incident_id: IncidentId, book: BookDep, settings: SettingsDep,
                 _: Viewer) -> Response:
    return _json(IncidentDetail.build(book.get(incident_id), settings.public_url))


@router.get("/{incident_id}/evidence", response_model=EvidenceView, responses=errors(404))
def get_evidence(incident_id: IncidentId, book: BookDep, ctx: ContextDep,
                 _: Viewer) -> EvidenceView:
    """The root slice's evidence since onset and the effect in every alarmed slice, with a
    hint where the slice's cell is judged against a parent baseline that does not fit it."""
    inc = book.get(incident_id)
    catalog = ctx.catalog()
    effects = [SliceEffect(slice_id=s.ref.slice_id, template=s.ref.template,
                           root=s.ref.slice_id == inc.root.slice_id, strength=s.strength,
                           displaced=s.displaced, n_since_onset=s.n_since_onset, onset=s.onset,
                           last_time=s.last_time, model_versions=s.model_versions,
                           cells=CellsView.of(s), baseline_misfit=BaselineMisfitView.of(
                               catalog.misfit(s.ref, s.reference_id)))
               for s in inc.slices.values()]
    effects.sort(key=lambda e: (not e.root, -e.strength))
    return EvidenceView(incident_id=inc.id, evidence=inc.evidence, slices=effects)


@router.get("/{incident_id}/exemplars", response_model=list[ExemplarView],
            responses=errors(404))
def get_exemplars(incident_id: IncidentId, book: BookDep, ctx: ContextDep,
                  _: Viewer) -> list[ExemplarView]:
    """Exemplar events (changed ones first) with their nearest reference exemplars."""
    inc = book.get(incident_id)
    rows = ctx.recent().snapshot().rows
    return [ExemplarView(exemplar=x, in_recent_buffer=x.event_id in rows)
            for x in inc.evidence.exemplars]


@router.get("/{incident_id}/exemplars/{event_id}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}},
                             "description": "JPEG thumbnail, at most 160 px on its longest side"},
                       **errors(404)})
def get_thumbnail(incident_id: IncidentId, event_id: EventId,
                  book: BookDep, ctx: ContextDep, _: Viewer) -> Response:
    """The exemplar's image, small. Made from the event in the events topic on first request
    and kept as long as resolved incidents after its last view; 404 with the reason when the
    event is past the topic's retention or carried an embedding instead of an image, 503 when
    Kafka cannot be read right now."""
    inc = book.get(incident_id)
    found = [x for x in inc.evidence.exemplars if x.event_id == event_id]
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            detail=f"{event_id!r} is not an exemplar of {inc.id}")
    x = found[0]
    try:
        jpeg = ctx.thumbnails().get(event_id, x.source_partition, x.source_offset)
    except ThumbnailUnavailable as exc:
        code = status.HTTP_503_SERVICE_UNAVAILABLE if exc.transient else status.HTTP_404_NOT_FOUND
        raise HTTPException(code, detail=f"no thumbnail: {exc}") from None
    return Response(jpeg, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=86400"})


@router.get("/{incident_id}/label-set", response_class=Response,
            responses={200: {"content": {JSONL: {"schema": {"type": "string"}}},
                             "description": "one JSON object per line: event_id, slice_id, "
                                            "cluster, ood, distance, ts, covers, "
                                            "reference_exemplars, source {partition, offset}, "
                                            "thumbnail (URL)"}, **errors(404)})
def get_label_set(incident_id: IncidentId, book: BookDep, ctx: ContextDep,
                  _: Viewer) -> Response:
    """The smallest set of exemplars covering the incident in embedding space, as JSON Lines
    (distances in the reference space when every exemplar is still in the recent buffer)."""
    inc = book.get(incident_id)
    snap = ctx.recent().snapshot()
    ids = [x.event_id for x in inc.evidence.exemplars]
    embeddings = None
    if ids and all(i in snap.rows for i in ids):
        embeddings = {i: np.asarray(snap.vectors[snap.rows[i]], np.float64).tolist()
                      for i in ids}
    url = incident_link(ctx.settings.public_url, inc.id)
    return Response(label_set_jsonl(inc, embeddings, incident_url=url), media_type=JSONL, headers={
        "Content-Disposition": f'attachment; filename="{inc.id}-label-set.jsonl"'})


@router.get("/{incident_id}/recurrence", response_model=list[RecurrenceView],
            responses=errors(404))
def get_recurrence(incident_id: IncidentId, book: BookDep, settings: SettingsDep,
                   _: Viewer) -> list[RecurrenceView]:
    """Past incidents whose evidence matches this one ("seen before"), best first."""
    out = []
    for link in book.get(incident_id).recurrence:
        view = RecurrenceView(incident_id=link.incident_id, similarity=link.similarity,
                              available=False,
                              link=incident_link(settings.public_url, link.incident_id))
        try:
            past: Incident = book.get(link.incident_id)
        except IncidentNotFound:
            out.append(view)
            continue
        out.append(view.model_copy(update={
            "available": True, "root": past.root, "resolved_at": past.resolved_at,
            "category": past.resolution.category if past.resolution else None}))
    return out


@router.post("/{incident_id}/acknowledge", response_model=IncidentDetail,
             responses=errors(404, 409, 415))
def acknowledge(incident_id: IncidentId, book: BookDep, settings: SettingsDep,
                caller: Operator,
                body: Annotated[AcknowledgeRequest | None, Body()] = None) -> IncidentDetail:
    """Open → acknowledged (the body with a note is optional)."""
    inc = book.acknowledge(incident_id, caller.name, body.note if body else None)
    return IncidentDetail.build(inc, settings.public_url)


@router.post("/{incident_id}/resolve", response_model=IncidentDetail,
             responses=errors(404, 409, 415))
def resolve(incident_id: IncidentId, body: ResolveRequest, book: BookDep,
            settings: SettingsDep, caller: Operator) -> IncidentDetail:
    """Resolve with a root-cause category (or classify an auto-resolved incident); the
    detect stage is asked to reset the incident's slices."""
    inc = book.resolve(incident_id, body.category, body.note, caller.name)
    return IncidentDetail.build(inc, settings.public_url)


@router.post("/{incident_id}/annotations", response_model=IncidentDetail,
             status_code=status.HTTP_201_CREATED, responses=errors(404, 415))
def annotate(incident_id: IncidentId, body: AnnotateRequest, book: BookDep,
             settings: SettingsDep, caller: Operator) -> IncidentDetail:
    """Add a note to the incident's timeline."""
    inc = book.annotate(incident_id, body.note, caller.name)
    return IncidentDetail.build(inc, settings.public_url)
