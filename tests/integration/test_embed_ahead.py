"""Embed workers running one batch ahead (one onnxruntime thread on a machine with more cores)
against the real broker and Redis.

The loop polls batch n + 1 while the model embeds batch n, and commits each batch's own offsets
once its updates are flushed and delivered. So (1) when a second worker joins mid-stream and the
first leaves, every event's slice-updates go out exactly once: before a poll that could rejoin the
group the loop finishes and commits its batch in flight (kafka-python revokes inside ``poll``, on
its network thread, where nothing can be committed); and (2) a worker killed with a batch in
flight has not committed it, so its restart reads it again: nothing is lost (committing the
consumer's position instead loses that batch — checked by mutation).
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
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
from tests.integration.pipeline_support import Pipeline, Worker, wait_for
from tests.integration.test_reference_demo import _jpeg

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
EVENTS = 720
PARTITIONS = 4


def _small_jpeg(frame: np.ndarray) -> bytes:  # half size: the model's work, not decoding
    return _jpeg(np.asarray(Image.fromarray(frame).resize((384, 288))))


def _event(i: int, jpeg: bytes) -> dict[str, object]:
    return {"event_id": f"img-{i}", "ts": (T0 + timedelta(seconds=i)).isoformat(),
            "station": f"cam-{i % 3}", "shift": "day", "lot": "L1", "model_version": "v1",
            "image": base64.b64encode(jpeg).decode()}


@dataclass
class ImageStream:
    model: Path
    reference: Path
    jpegs: list[bytes]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageStream:
    """An image reference of vtest frames through the demo model, and frames to stream."""
    model = build_demo_model()
    frames = list(read_video_frames(fetch_demo_data() / VTEST_VIDEO))[::3]
    jpegs = [_small_jpeg(f) for f in frames]
    out = tmp_path_factory.mktemp("ahead") / "ref"
    builder = Embedder(EmbedderConfig(model_path=model, intra_op_threads=1))
    build_reference([Event.model_validate(_event(i, j)) for i, j in enumerate(jpegs[:60])],
                    builder, out, min_count=20)
    builder.close()
    return ImageStream(model, out, jpegs)


def _produce(bootstrap: str, topic: str, images: ImageStream, bad: set[int]) -> None:
    producer = make_producer(bootstrap)
    for i in range(EVENTS):  # bad ones: undecodable images, dead-lettered with their reason
        jpeg = b"\xff\xd8\xff not a jpeg" if i in bad else images.jpegs[i % len(images.jpegs)]
        producer.send(topic, key=f"cam-{i % 3}".encode(),
                      value=json.dumps(_event(i, jpeg)).encode())
    producer.flush()
    producer.close()


def _read(bootstrap: str, topic: str) -> list[dict[str, object]]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    try:
        return [json.loads(m.value) for m in consumer]
    finally:
        consumer.close()


def _committed(bootstrap: str, group: str, topic: str) -> int:
    probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(probe.committed(TopicPartition(topic, p)) or 0 for p in range(PARTITIONS))
    finally:
        probe.close()


needs_two_cores = pytest.mark.skipif(usable_cpus() < 2,
                                     reason="one batch ahead needs a core beside the model")


@needs_two_cores
def test_workers_one_batch_ahead_hand_over_without_loss_or_replay(
        kafka_bootstrap: str, redis_url: str, images: ImageStream) -> None:
    name = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap, redis_url=redis_url, reference_dir=images.reference,
        model_path=images.model, onnx_threads=1, embed_batch_size=8,
        events_topic=f"t{name}.events", slice_updates_topic=f"t{name}.slice-updates",
        dlq_topic=f"t{name}.dlq", embed_group=f"g{name}-embed")
    ensure_topics(kafka_bootstrap, {settings.events_topic: PARTITIONS,
                                    settings.slice_updates_topic: 2, settings.dlq_topic: 1})
    bad = {EVENTS // 3, EVENTS // 2}
    _produce(kafka_bootstrap, settings.events_topic, images, bad)
    ref = load_reference(images.reference)

    def worker() -> tuple[EmbedStage, threading.Thread]:
        stage = build_embed_stage(settings, CollectorRegistry(), ref, make_embedder(settings, ref))
        assert stage._model is not None, "one onnxruntime thread of several cores: one ahead"
        thread = threading.Thread(target=stage.run, daemon=True)
        thread.start()
        return stage, thread

    def committed() -> int:
        return _committed(kafka_bootstrap, settings.embed_group, settings.events_topic)

    first, first_thread = worker()
    wait_for(lambda: committed() >= EVENTS // 8, 180, "the first worker to commit some batches")
    second, second_thread = worker()  # joins: the first hands over half its partitions
    wait_for(lambda: committed() >= EVENTS // 2, 180, "both workers to go on")
    first.stop()  # leaves: the second takes every partition back
    first_thread.join(60)
    wait_for(lambda: committed() == EVENTS, 180, "every event to be committed")
    second.stop()
    second_thread.join(60)
    assert not first_thread.is_alive() and not second_thread.is_alive()
    for stage in (first, second):
        stage.embedder.close()  # type: ignore[union-attr]

    updates = Counter(str(u["event_id"])
                      for u in _read(kafka_bootstrap, settings.slice_updates_topic))
    good = {f"img-{i}" for i in range(EVENTS) if i not in bad}
    assert set(updates) == good  # nothing lost
    replayed = {e: n for e, n in updates.items() if n != len(settings.slice_templates)}
    assert replayed == {}, f"events whose updates went out more than once: {replayed}"
    dead = _read(kafka_bootstrap, settings.dlq_topic)
    assert sorted(str(d["event_id"]) for d in dead) == sorted(f"img-{i}" for i in bad)
    assert {d["reason"] for d in dead} == {"image_undecodable"}


@needs_two_cores
def test_sigkill_of_a_worker_one_batch_ahead_loses_nothing(
        kafka_bootstrap: str, redis_url: str, images: ImageStream, tmp_path: Path) -> None:
    """The batch in flight when the worker dies was polled, not committed: its restart reads
    it again (at-least-once; the detect stage skips the duplicates by source offset)."""
    pipe = Pipeline(kafka_bootstrap, redis_url, images.reference, event_partitions=PARTITIONS,
                    partitions=2)
    pipe.create_topics()
    bad = {EVENTS // 4}
    _produce(kafka_bootstrap, pipe.events_topic, images, bad)
    env = {"DRIFTLINE_ONNX_THREADS": "1", "DRIFTLINE_MODEL_PATH": str(images.model),
           "DRIFTLINE_EMBED_BATCH_SIZE": "8"}
    workers: list[Worker] = []
    try:
        first = Worker(pipe, "embed", tmp_path, **env)
        workers.append(first)
        first.wait_ready()
        group = pipe.env()["DRIFTLINE_EMBED_GROUP"]
        wait_for(lambda: _committed(kafka_bootstrap, group, pipe.events_topic) >= EVENTS // 4,
                 180, "the worker to commit some batches")
        assert "embed loop started, one batch ahead" in first.log_path.read_text()
        first.kill()  # mid-stream: a batch is in flight on the model thread
        killed_at = _committed(kafka_bootstrap, group, pipe.events_topic)
        assert killed_at < EVENTS, "the stream ended before the kill: nothing to test"
        second = Worker(pipe, "embed", tmp_path, **env)
        workers.append(second)
        wait_for(lambda: _committed(kafka_bootstrap, group, pipe.events_topic) == EVENTS, 240,
                 "the restarted worker to commit every event")
        assert second.terminate() == 0
    finally:
        for w in workers:
            if w.alive():
                w.kill()
    updates = Counter(str(u["event_id"]) for u in _read(kafka_bootstrap, pipe.updates_topic))
    good = {f"img-{i}" for i in range(EVENTS) if i not in bad}
    assert set(updates) == good, f"lost: {sorted(good - set(updates))[:10]}"
    templates = len(Settings().slice_templates)
    assert all(n % templates == 0 for n in updates.values())  # whole events, maybe replayed
    replayed = sum(1 for n in updates.values() if n > templates)
    print(f"SIGKILL at {killed_at} committed events; {replayed} events replayed by the restart")
