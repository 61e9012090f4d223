"""The label set: the smallest set of an incident's samples covering it (greedy k-center)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from urllib.parse import quote

import numpy as np

from driftline.alerts.model import Exemplar, Incident


def label_set(exemplars: Sequence[Exemplar],
              embeddings: Mapping[str, Sequence[float]] | None = None,
              radius: float = 0.3) -> list[tuple[Exemplar, int]]:
    """Greedy k-center cover of the exemplars: ``(chosen sample, how many it covers)``.

    With an embedding for every exemplar, distances are Euclidean between unit vectors and
    points are added farthest-first until every exemplar is within ``radius`` of a chosen one
    (Gonzalez 1985: at most twice the optimal radius for the same count). Otherwise two
    exemplars are at distance 0 when they share cluster and OOD flag, else 1: one sample per
    (cluster, OOD) group, the most atypical (largest distance) of each.
    """
    if not exemplars:
        return []
    if embeddings is not None and all(x.event_id in embeddings for x in exemplars):
        pts = np.asarray([embeddings[x.event_id] for x in exemplars], np.float64)
        pts /= np.maximum(np.linalg.norm(pts, axis=1, keepdims=True), 1e-12)
        dist = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=2)
        first = int(np.argmin(np.linalg.norm(pts - pts.mean(axis=0), axis=1)))
    else:
        keys = [(x.cluster, bool(x.ood)) for x in exemplars]
        dist = np.asarray([[0.0 if a == b else 1.0 for b in keys] for a in keys])
        first = int(np.argmax([x.distance or 0.0 for x in exemplars]))
        radius = 0.0
    chosen = [first]
    nearest = dist[first].copy()
    while nearest.max() > radius:
        far = [int(i) for i in np.flatnonzero(nearest == nearest.max())]
        pick = max(far, key=lambda i: exemplars[i].distance or 0.0)
        chosen.append(pick)
        nearest = np.minimum(nearest, dist[pick])
    owner = np.argmin(dist[chosen], axis=0)
    return [(exemplars[c], int((owner == j).sum())) for j, c in enumerate(chosen)]


def label_set_jsonl(incident: Incident, embeddings: Mapping[str, Sequence[float]] | None = None,
                    radius: float = 0.3, incident_url: str | None = None) -> str:
    """The label set as JSON Lines, one sample per line, for a labeling tool: where each event
    is in the events topic and, given the incident's API URL, its thumbnail's URL."""
    lines = []
    for x, covers in label_set(incident.evidence.exemplars, embeddings, radius):
        known = x.source_partition is not None and x.source_offset is not None
        row = {"incident_id": incident.id, "event_id": x.event_id, "slice_id": x.slice_id,
               "cluster": x.cluster, "ood": x.ood, "distance": x.distance,
               "ts": x.ts.isoformat() if x.ts else None, "covers": covers,
               "reference_exemplars": x.reference_exemplars,
               "source": {"partition": x.source_partition, "offset": x.source_offset}
               if known else None,
               "thumbnail": f"{incident_url}/exemplars/{quote(x.event_id, safe='')}/thumbnail"
               if known and incident_url else None}
        lines.append(json.dumps(row, sort_keys=True))
    return "".join(line + "\n" for line in lines)
