"""The label set: greedy k-center cover of an incident's exemplars, exported as JSONL."""

from __future__ import annotations

import json

import numpy as np

from driftline.alerts.labelset import label_set, label_set_jsonl
from driftline.alerts.model import Exemplar
from tests.unit.alerts.synthetic import alarm
from tests.unit.alerts.test_grouping import active, feed, grouper


def _x(eid: str, cluster: int, ood: bool = False, distance: float = 0.1) -> Exemplar:
    return Exemplar(event_id=eid, slice_id="station=press-3", cluster=cluster, ood=ood,
                    distance=distance)


def test_label_set_without_embeddings_is_one_sample_per_cluster_and_ood_group() -> None:
    xs = [_x("a", 0, distance=0.1), _x("b", 0, distance=0.5), _x("c", 2),
          _x("d", 2, ood=True, distance=0.9), _x("e", 0, distance=0.2)]
    chosen = label_set(xs)
    assert sorted(x.event_id for x, _ in chosen) == ["b", "c", "d"]
    assert sum(n for _, n in chosen) == len(xs)
    assert dict((x.event_id, n) for x, n in chosen)["b"] == 3


def test_label_set_with_embeddings_covers_every_sample_within_the_radius() -> None:
    rng = np.random.default_rng(3)
    centers = np.eye(16)[:3]
    emb = {f"e{i}": (centers[i % 3] + 0.03 * rng.standard_normal(16)).tolist()
           for i in range(30)}
    xs = [_x(eid, 0) for eid in emb]
    chosen = label_set(xs, emb, radius=0.3)
    assert len(chosen) == 3  # three tight blobs: three samples cover them
    assert sorted(n for _, n in chosen) == [10, 10, 10]


def test_label_set_jsonl_has_one_line_per_chosen_sample() -> None:
    g = grouper()
    feed(g, alarm("station=press-3", 1.0))
    (inc,) = active(g)
    lines = [json.loads(line) for line in label_set_jsonl(inc).splitlines()]
    assert lines and all(row["incident_id"] == inc.id for row in lines)
    assert sum(row["covers"] for row in lines) == len(inc.evidence.exemplars)
