"""Helpers for pipeline tests: a synthetic reference, event streams, worker subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from driftline.consumers.checkpoint import decode_record
from driftline.consumers.kafka_io import ensure_topics
from driftline.core.snapshot import plain
from driftline.localstack import free_port
from driftline.reference.build import build_reference
from driftline.schema import Event

DIM = 16
K_TRUE = 6
STATIONS = ("s1", "s2", "s3")
SHIFTS = ("day", "evening", "night")
T0 = datetime(2026, 11, 2, 6, 0, tzinfo=UTC)
STEP = timedelta(seconds=2)


def centers(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(K_TRUE + 1, DIM))  # the last one is "never seen in the reference"
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@dataclass
class Stream:
    """A deterministic plant: stations take turns, shifts change every ``shift_len`` events."""

    n: int
    seed: int = 1
    change_station: str | None = None
    change_at: int | None = None
    change_share: float = 0.6
    shift_len: int = 300
    lot_len: int = 500
    noise: float = 0.08

    def events(self) -> list[dict[str, Any]]:
        rng = np.random.default_rng(self.seed)
        cs = centers()
        out = []
        for i in range(self.n):
            station = STATIONS[i % len(STATIONS)]
            shift = SHIFTS[(i // self.shift_len) % len(SHIFTS)]
            mix = np.roll(np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05]), STATIONS.index(station))
            c = int(rng.choice(K_TRUE, p=mix))
            changed = (station == self.change_station and self.change_at is not None
                       and i >= self.change_at and rng.random() < self.change_share)
            vec = cs[K_TRUE if changed else c] + self.noise * rng.normal(size=DIM)
            out.append({
                "event_id": f"e{self.seed}-{i}", "ts": (T0 + i * STEP).isoformat(),
                "station": station, "shift": shift, "lot": f"L{i // self.lot_len}",
                "model_version": "v1", "embedding": [round(float(x), 6) for x in vec]})
        return out


def make_reference(out_dir: Path) -> Path:
    events = [Event.model_validate(e) for e in Stream(n=1800, seed=99).events()]
    build_reference(events, None, out_dir, k=8, min_count=200)
    return out_dir


@dataclass
class Pipeline:
    """Unique topics, groups and Redis database for one test."""

    bootstrap: str
    redis_url: str
    reference: Path
    partitions: int = 4
    event_partitions: int = 2
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def events_topic(self) -> str:
        return f"t{self.name}.events"

    @property
    def updates_topic(self) -> str:
        return f"t{self.name}.slice-updates"

    @property
    def dlq_topic(self) -> str:
        return f"t{self.name}.dlq"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLINE_")}
        env.update({
            "DRIFTLINE_KAFKA_BOOTSTRAP": self.bootstrap, "DRIFTLINE_REDIS_URL": self.redis_url,
            "DRIFTLINE_REFERENCE_DIR": str(self.reference),
            "DRIFTLINE_EVENTS_TOPIC": self.events_topic,
            "DRIFTLINE_SLICE_UPDATES_TOPIC": self.updates_topic,
            "DRIFTLINE_DLQ_TOPIC": self.dlq_topic,
            "DRIFTLINE_ALERTS_TOPIC": f"t{self.name}.alerts",
            "DRIFTLINE_EMBED_GROUP": f"g{self.name}-embed",
            "DRIFTLINE_DETECT_GROUP": f"g{self.name}-detect",
            "DRIFTLINE_TOPIC_PARTITIONS": str(self.partitions),
            "DRIFTLINE_CHECKPOINT_INTERVAL_MS": "200", "DRIFTLINE_LOG_FORMAT": "console",
            "DRIFTLINE_AUTORESOLVE_EVENTS": "100000", "DRIFTLINE_CACHE_DIR": "/nonexistent",
        })
        env.update(extra)
        return env

    def create_topics(self) -> None:
        ensure_topics(self.bootstrap, {self.events_topic: self.event_partitions,
                                       self.updates_topic: self.partitions,
                                       self.dlq_topic: 1})

    def produce(self, docs: Iterable[dict[str, Any] | bytes]) -> int:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        n = 0
        for doc in docs:
            value = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            key = str(doc.get("station") or "x").encode() if isinstance(doc, dict) else b"bad"
            producer.send(self.events_topic, key=key, value=value)
            n += 1
        producer.flush()
        producer.close()
        return n

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def end_offsets(self, topic: str) -> dict[int, int]:
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap)
        try:
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
            return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
        finally:
            consumer.close()

    def read_topic(self, topic: str) -> list[Any]:
        consumer = KafkaConsumer(topic, bootstrap_servers=self.bootstrap,
                                 auto_offset_reset="earliest", consumer_timeout_ms=3000)
        try:
            return list(consumer)
        finally:
            consumer.close()


def detect_done(pipe: Pipeline, at_least: int = 1, prefix: str = "dl:detect") -> bool:
    """The slice-updates topic holds ``at_least`` messages and Redis's checkpointed input
    offsets reached its end."""
    ends = pipe.end_offsets(pipe.updates_topic)
    if sum(ends.values()) < at_least:
        return False
    stored = checkpointed(pipe, prefix)
    return all(stored.get(p, 0) >= e for p, e in ends.items())


def checkpointed(pipe: Pipeline, prefix: str = "dl:detect") -> dict[int, int]:
    """The slice-updates offsets, per partition, that the detect stage's last checkpoints
    stored: where a restarted worker reads from."""
    return {int(k): int(v) for k, v in pipe.redis().hgetall(f"{prefix}:offsets").items()}


def states(pipe: Pipeline, prefix: str = "dl:detect") -> dict[str, dict[str, Any]]:
    """Every slice's checkpoint record, decoded, arrays as lists: comparable with ``==``."""
    r = pipe.redis()
    out: dict[str, dict[str, Any]] = {}
    for key in r.scan_iter(match=f"{prefix}:state:*"):
        out.update({k.decode(): plain(decode_record(v)) for k, v in r.hgetall(key).items()})
    return out


def outbox(pipe: Pipeline, prefix: str = "dl:detect") -> list[dict[str, Any]]:
    return [json.loads(f[b"alarm"]) for _, f in pipe.redis().xrange(f"{prefix}:outbox")]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Worker:
    """``driftline run ROLE`` as a subprocess, so tests can SIGKILL it."""

    def __init__(self, pipe: Pipeline, role: str, log_dir: Path, **env: str) -> None:
        self.role = role
        self.port = free_port()
        self.log_path = log_dir / f"{role}-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "driftline.cli", "run", role, "--port", str(self.port)],
            env=pipe.env(**env), stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 150) -> None:
        """Until /readyz answers 200: reference loaded and every stage owns partitions."""
        import httpx

        def ready() -> bool:
            assert self.alive(), self.log()
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).is_success
            except httpx.HTTPError:
                return False
        try:
            wait_for(ready, timeout, f"{self.role} worker readiness")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{self.log()}") from None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the worker stays as it is (its sockets open) until :meth:`resume` or
        :meth:`kill`."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def metric(self, sample: str) -> float:
        """The sum of ``sample``'s series in the worker's ``/metrics`` (0 if it has none)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        return sum(s.value for fam in text_string_to_metric_families(text)
                   for s in fam.samples if s.name == sample)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]
