"""Embed workers running one batch ahead (one onnxruntime thread on a machine with more cores),
against the real broker and Redis: a second worker joins mid-stream and the first leaves, and
every event still yields its slice-updates exactly once, with nothing left uncommitted.

The loop polls batch n + 1 while the model embeds batch n. At each rebalance the revoked
worker must finish and commit its batch in flight while the partitions are still its own;
otherwise the next owner reads that batch again and its updates go out twice (harmless to the
detect stage, which skips them, but a sign that the hand-over is wrong).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from PIL import Image
from prometheus_client import CollectorRegistry

from driftline.config import Settings
from driftline.consumers.embed_stage import EmbedStage
from driftline.consumers.embedder import Embedder, EmbedderConfig, usable_cpus
from driftline.consumers.kafka_io import ensure_topics, make_producer
from driftline.demo.data import VTEST_VIDEO, fetch_demo_data, read_video_frames
from driftline.demo.model import build_demo_model
from driftline.reference.build import build_reference
from driftline.reference.index import load_reference
from driftline.runner import build_embed_stage, make_embedder
from driftline.schema import Event
from tests.integration.pipeline_support import wait_for

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
EVENTS = 240


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).resize((384, 288)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _event(i: int, jpeg: bytes) -> dict[str, object]:
    return {"event_id": f"img-{i}", "ts": (T0 + timedelta(seconds=i)).isoformat(),
            "station": f"cam-{i % 3}", "shift": "day", "lot": "L1", "model_version": "v1",
            "image": base64.b64encode(jpeg).decode()}


@pytest.mark.skipif(usable_cpus() < 2, reason="one batch ahead needs a core beside the model")
def test_workers_one_batch_ahead_hand_over_without_loss_or_replay(
        kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    model = build_demo_model()
    frames = list(read_video_frames(fetch_demo_data() / VTEST_VIDEO))[::3]
    jpegs = [_jpeg(f) for f in frames]
    builder = Embedder(EmbedderConfig(model_path=model, intra_op_threads=1))
    build_reference([Event.model_validate(_event(i, j)) for i, j in enumerate(jpegs[:60])],
                    builder, tmp_path / "ref", min_count=20)
    builder.close()
    ref = load_reference(tmp_path / "ref")
    name = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, reference_dir=tmp_path / "ref",
        model_path=model, onnx_threads=1, embed_batch_size=8,
        events_topic=f"t{name}.events", slice_updates_topic=f"t{name}.slice-updates",
        dlq_topic=f"t{name}.dlq", embed_group=f"g{name}-embed")
    ensure_topics(kafka_bootstrap, {settings.events_topic: 4, settings.slice_updates_topic: 2,
                                    settings.dlq_topic: 1})
    producer = make_producer(kafka_bootstrap)
    bad = {EVENTS // 3, EVENTS // 2}  # undecodable images, dead-lettered with their reason
    for i in range(EVENTS):
        jpeg = b"\xff\xd8\xff not a jpeg" if i in bad else jpegs[i % len(jpegs)]
        producer.send(settings.events_topic, key=f"cam-{i % 3}".encode(),
                      value=json.dumps(_event(i, jpeg)).encode())
    producer.flush()
    producer.close()

    def worker() -> tuple[EmbedStage, threading.Thread]:
        stage = build_embed_stage(settings, CollectorRegistry(), ref, make_embedder(settings, ref))
        assert stage._model is not None, "one onnxruntime thread of several cores: one ahead"
        thread = threading.Thread(target=stage.run, daemon=True)
        thread.start()
        return stage, thread

    def committed() -> int:
        probe = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=settings.embed_group,
                              enable_auto_commit=False)
        try:
            tps = [TopicPartition(settings.events_topic, p) for p in range(4)]
            return sum(probe.committed(tp) or 0 for tp in tps)
        finally:
            probe.close()

    first, first_thread = worker()
    wait_for(lambda: committed() >= EVENTS // 6, 180, "the first worker to commit some batches")
    second, second_thread = worker()  # joins: the first hands over half its partitions
    wait_for(lambda: committed() >= EVENTS // 2, 180, "both workers to go on")
    first.stop()  # leaves: the second takes every partition back
    first_thread.join(60)
    wait_for(lambda: committed() == EVENTS, 180, "every event to be committed")
    second.stop()
    second_thread.join(60)
    assert not first_thread.is_alive() and not second_thread.is_alive()
    assert first.embedder is not None and second.embedder is not None
    first.embedder.close()  # type: ignore[attr-defined]
    second.embedder.close()  # type: ignore[attr-defined]

    def read(topic: str) -> list[dict[str, object]]:
        consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                                 auto_offset_reset="earliest", consumer_timeout_ms=5000)
        try:
            return [json.loads(m.value) for m in consumer]
        finally:
            consumer.close()

    updates = Counter(str(u["event_id"]) for u in read(settings.slice_updates_topic))
    templates = len(settings.slice_templates)
    good = {f"img-{i}" for i in range(EVENTS) if i not in bad}
    assert set(updates) == good  # nothing lost
    replayed = {e: n for e, n in updates.items() if n != templates}
    assert replayed == {}, f"events whose updates went out more than once: {replayed}"
    dead = read(settings.dlq_topic)
    assert sorted(str(d["event_id"]) for d in dead) == sorted(f"img-{i}" for i in bad)
    assert {d["reason"] for d in dead} == {"image_undecodable"}
