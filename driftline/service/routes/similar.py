"""``/api/v1/similar``: the k nearest recent and reference events to an event or an incident.

Recent events come from the bounded buffer ``dl:recent`` (faiss flat index, exact search);
reference events from :meth:`Reference.nearest`. For an incident the queries are its exemplars
still in the buffer; each neighbour keeps its smallest distance to any query, and the queries
themselves are left out.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Query, status

from driftline.alerts.model import utc
from driftline.service.deps import BookDep, ContextDep, Viewer
from driftline.service.recent import Snapshot
from driftline.service.routes import EncodedSlashRoute
from driftline.service.schemas.analysis import (
    RecentNeighbour,
    ReferenceNeighbour,
    SimilarQuery,
    SimilarResult,
)
from driftline.service.schemas.common import COMMON_ERRORS, errors

router = APIRouter(prefix="/similar", tags=["similar"], responses=COMMON_ERRORS,
                   route_class=EncodedSlashRoute)

K = Annotated[int, Query(ge=1, le=100, description="neighbours of each kind")]


def _recent(snap: Snapshot, rows: list[int], k: int) -> list[RecentNeighbour]:
    skip = set(rows)
    dist, idx = snap.search(snap.vectors[rows], k + len(rows))
    best: dict[int, float] = {}
    for d_row, i_row in zip(dist, idx, strict=True):
        for d, i in zip(d_row.tolist(), i_row.tolist(), strict=True):
            if i >= 0 and i not in skip and d < best.get(i, np.inf):
                best[i] = d
    out = []
    for i, d in sorted(best.items(), key=lambda kv: (kv[1], kv[0]))[:k]:
        m: dict[str, Any] = snap.metas[i]
        ts = m.get("ts")
        out.append(RecentNeighbour(
            event_id=m["event_id"], distance=round(d, 6),
            ts=utc(float(ts)) if isinstance(ts, int | float) else None,
            **{f: m.get(f) for f in ("station", "shift", "lot", "model_version", "cluster",
                                     "pred", "score", "label")}))
    return out


def _reference(ctx: ContextDep, snap: Snapshot, rows: list[int],
               k: int) -> list[ReferenceNeighbour]:
    ref = ctx.reference()
    if ref is None or not rows:
        return []
    dist, ids = ref.nearest(snap.raw[rows], min(k, len(ref.event_ids)))
    cluster = ctx.reference_clusters()
    best: dict[str, float] = {}
    for d_row, id_row in zip(dist.tolist(), ids, strict=True):
        for d, eid in zip(d_row, id_row, strict=False):
            best[eid] = min(d, best.get(eid, np.inf))
    return [ReferenceNeighbour(event_id=e, distance=round(d, 6), cluster=cluster.get(e))
            for e, d in sorted(best.items(), key=lambda kv: (kv[1], kv[0]))[:k]]


def _result(ctx: ContextDep, snap: Snapshot, query: SimilarQuery, k: int) -> SimilarResult:
    rows = [snap.rows[e] for e in query.event_ids]
    return SimilarResult(query=query, space="reference" if snap.space == "reference" else "raw",
                         buffer_events=len(snap), recent=_recent(snap, rows, k),
                         reference=_reference(ctx, snap, rows, k))


@router.get("/events/{event_id}", response_model=SimilarResult, responses=errors(404))
def similar_to_event(event_id: Annotated[str, Path(
                         max_length=200, examples=["e-000123"],
                         description="event id ('/' sent as %2F)")],
                     ctx: ContextDep, _: Viewer, k: K = 10) -> SimilarResult:
    """Nearest recent and reference events to one event of the recent buffer."""
    snap = ctx.recent().snapshot()
    if event_id not in snap.rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=(
            f"event {event_id!r} is not in the recent buffer (it holds the newest "
            f"{len(snap)} events; DRIFTLINE_RECENT_BUFFER_SIZE sets how many)"))
    return _result(ctx, snap, SimilarQuery(kind="event", id=event_id, event_ids=[event_id]), k)


@router.get("/incidents/{incident_id}", response_model=SimilarResult, responses=errors(404))
def similar_to_incident(incident_id: Annotated[str, Path(max_length=64, examples=["DL-000001"])],
                        ctx: ContextDep, book: BookDep, _: Viewer, k: K = 10) -> SimilarResult:
    """Nearest recent and reference events to an incident's exemplars."""
    inc = book.get(incident_id)
    snap = ctx.recent().snapshot()
    ids = [x.event_id for x in inc.evidence.exemplars if x.event_id in snap.rows]
    if not ids:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=(
            f"none of the {len(inc.evidence.exemplars)} exemplars of {inc.id} is still in the "
            f"recent buffer (it holds the newest {len(snap)} events)"))
    return _result(ctx, snap, SimilarQuery(kind="incident", id=inc.id, event_ids=ids), k)
