"""The embed stage's labels against a real Redis (its prediction cache): a label sent with its
event and one that arrives later reach the detect stage marked apart."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from prometheus_client import CollectorRegistry

from driftline.consumers.embed_stage import EmbedStage
from driftline.metrics import EmbedMetrics
from tests.unit.consumers.test_embed_stage import Embedder, Msg, Producer, Reference, _event

pytestmark = pytest.mark.integration


def test_inline_and_late_labels_are_told_apart(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(CollectorRegistry()), redis_client=client)
    tag = uuid.uuid4().hex[:8]
    pred = {"label": "ok", "score": 0.9}
    stage.process([
        Msg("ev", 0, 0, b"k", _event(0, "s1", event_id=f"{tag}-0", embedding=[1.0, 0.0, 0.0],
                                     prediction=pred, label="scratch")),
        Msg("ev", 0, 1, b"k", _event(1, "s1", event_id=f"{tag}-1", embedding=[0.0, 1.0, 0.0],
                                     prediction=pred))])
    # the late label, then a new event of the same station, in one batch
    stage.process([
        Msg("ev", 0, 2, b"k", json.dumps({
            "event_id": f"{tag}-1", "ts": "2026-11-23T09:00:00Z", "station": "s1",
            "shift": "day", "lot": "L1", "label": "scratch"}).encode()),
        Msg("ev", 0, 3, b"k", _event(3, "s1", event_id=f"{tag}-3", embedding=[0.0, 0.0, 1.0]))])
    updates = [json.loads(v) for t, _, v in producer.sent if t == "up"]
    got = [(u["event_id"], u["label"], u["error"], u["late_label"], u["distance"] is not None)
           for u in updates]
    assert got == [(f"{tag}-0", "scratch", True, False, True),  # counted for drift too
                   (f"{tag}-1", None, None, False, True),
                   (f"{tag}-1", "scratch", True, True, False),  # the error detectors only
                   (f"{tag}-3", None, None, False, True)]
    # sent in source order, as the detect stage's skip-by-highest-offset needs: the label
    # (offset 2) was looked up after the event at offset 3 was embedded, but goes first
    assert [u["source_offset"] for u in updates] == [0, 1, 2, 3]
    client.close()
