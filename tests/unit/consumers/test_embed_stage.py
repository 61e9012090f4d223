"""EmbedStage.process without Kafka or a model: what it produces, dead-letters and counts."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from driftline.consumers.checkpoint import store_client
from driftline.consumers.embed_stage import EmbedStage
from driftline.consumers.imaging import ImageError, ImageSource, load_image
from driftline.metrics import EmbedMetrics
from driftline.reference.index import BaselineView


class Msg(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int = -1


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.headers: list[Any] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
             headers: Any = None) -> None:
        self.sent.append((topic, key, value))
        self.headers.append(headers)

    def flush(self) -> None:
        self.flushed = len(self.sent)


class Embedder:
    """Decodes like the real one (so bad images fail the same way); the mean colour is the
    embedding."""

    dim = 3

    def embed_images(self, sources: Sequence[ImageSource]) -> tuple[Any, list[Any]]:
        out = np.full((len(sources), 3), np.nan, np.float32)
        errors: list[ImageError | None] = [None] * len(sources)
        for i, src in enumerate(sources):
            try:
                out[i] = load_image(src, (8, 8)).reshape(-1, 3).mean(0) + 1.0
            except ImageError as exc:
                errors[i] = exc
        return out, errors


class Reference:
    dim = 3
    reference_id = "ref-test"

    def assign(self, emb: Any) -> tuple[Any, Any]:
        return np.zeros(len(emb), np.int64), np.full(len(emb), 0.5, np.float32)

    def baseline_for(self, station: str, shift: str) -> BaselineView:
        return BaselineView(f"station={station}", np.ones(1), 0.4, 0.01)


def _jpeg(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _event(n: int, station: str, **payload: Any) -> bytes:
    return json.dumps({"event_id": f"e{n}", "ts": f"2026-11-23T08:00:{n:02d}Z",
                       "station": station, "shift": "day", "lot": "L1", **payload}).encode()


def test_batch_produces_updates_dead_letters_and_counts_per_batch() -> None:
    registry = CollectorRegistry()
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(),
        templates=["station", "station+shift"], metrics=EmbedMetrics(registry),
        latency_sample_every=3)
    values = [
        _event(0, "s1", image=_jpeg((200, 10, 10))),
        _event(1, "s2", image=_jpeg((10, 200, 10))),
        _event(2, "s1", image=base64.b64encode(b"\xff\xd8\xff not a jpeg").decode()),
        b"{not json",
        _event(4, "s1", embedding=[1.0, 0.0, 0.0]),
        _event(5, "s1", image=_jpeg((10, 10, 200))),
    ]
    arrived = 1_795_420_000_000  # the events' Kafka timestamps (ms)
    stage.process([Msg("ev", 0, n, b"k", v, arrived + n) for n, v in enumerate(values)])

    updates = [json.loads(v) for t, _, v in producer.sent if t == "up"]
    assert [(u["event_id"], u["slice_id"]) for u in updates] == [
        (e, s) for e in ("e0", "e1", "e4", "e5")
        for s in (f"station={'s2' if e == 'e1' else 's1'}",
                  f"station={'s2' if e == 'e1' else 's1'}|shift=day")]
    assert all(u["ood"] is True and u["source_offset"] in (0, 1, 4, 5) for u in updates)
    assert {u["reference_id"] for u in updates} == {"ref-test"}  # what they were judged against
    # every 3rd slice-update (this stage's sample rate) carries its event's Kafka timestamp
    sent = [h for (t, _, _), h in zip(producer.sent, producer.headers, strict=True) if t == "up"]
    assert [h for i, h in enumerate(sent) if (i + 1) % 3] == [None] * 6
    assert [h for i, h in enumerate(sent) if not (i + 1) % 3] == [
        [("dl-src-ts", str(arrived + updates[i]["source_offset"]).encode())] for i in (2, 5)]
    dead = {json.loads(v)["offset"]: json.loads(v)["reason"]
            for t, _, v in producer.sent if t == "dlq"}
    assert dead == {2: "image_undecodable", 3: "malformed_json"}

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("driftline_embed_events_total", kind="inference") == 5
    assert sample("driftline_embed_slice_updates_total") == 8
    assert sample("driftline_embed_station_events_total", station="s1") == 3
    assert sample("driftline_embed_station_events_total", station="s2") == 1
    assert sample("driftline_embed_station_last_event_timestamp_seconds", station="s1") == (
        1795420805.0)  # e5, the last event of s1 in the batch
    assert sample("driftline_embed_dead_letters_total", reason="image_undecodable") == 1


def test_every_record_counts_once_in_events_total_and_dead_letters_are_a_part_of_it() -> None:
    """The dead-letter share is dead letters / events_total: a record that is no event counts
    as kind=invalid, one rejected after parsing under its kind, each once. Parse rejections
    were not counted there and later rejections were, so every image undecodable read as a
    share of 1/2."""
    registry, producer = CollectorRegistry(), Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(registry))
    broken = base64.b64encode(b"\xff\xd8\xff not a jpeg").decode()
    values = [_event(n, "s1", image=broken) for n in range(3)] + [b"{not json", b"[1]"]
    stage.process([Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])

    def samples(name: str) -> dict[str, float]:
        return {next(iter(s.labels.values())): s.value for m in registry.collect()
                for s in m.samples if s.name == name and s.value}

    assert samples("driftline_embed_events_total") == {"inference": 3, "invalid": 2}
    assert samples("driftline_embed_dead_letters_total") == {
        "image_undecodable": 3, "malformed_json": 1, "not_an_object": 1}
    assert sum(samples("driftline_embed_dead_letters_total").values()) == sum(
        samples("driftline_embed_events_total").values()) == len(values)


class LagConsumer:
    """What ``_report_lag`` reads of a consumer: its assignment and the fetched high marks."""

    def __init__(self) -> None:
        self.owned: set[Any] = set()
        self.high: dict[Any, int] = {}

    def assignment(self) -> set[Any]:
        return self.owned

    def highwater(self, tp: Any) -> int | None:
        return self.high.get(tp)


def test_lag_forgets_a_partition_once_it_moves_to_another_worker() -> None:
    from kafka import TopicPartition
    from prometheus_client import CollectorRegistry

    from driftline.consumers.embed_stage import _LogAssignments
    from driftline.metrics import ConsumerMetrics

    registry = CollectorRegistry()
    consumer = LagConsumer()
    stage = EmbedStage(
        consumer, Producer(), events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(registry), consumer_metrics=ConsumerMetrics(registry))
    tp = TopicPartition("ev", 0)
    listener = _LogAssignments(stage)

    def lag() -> float | None:
        stage._last_lag = 0.0
        stage._report_lag()
        return registry.get_sample_value("driftline_kafka_consumer_lag_messages",
                                         {"stage": "embed", "partition": "0"})

    consumer.owned, consumer.high, stage._next[tp] = {tp}, {tp: 150}, 100
    assert lag() == 50
    listener.on_partitions_revoked([tp])
    consumer.owned = set()
    assert lag() is None  # not ours now: its new owner reports it, no stale series to sum
    # another worker takes it to 200; it comes back idle: nothing read here yet, no false lag
    consumer.owned, consumer.high = {tp}, {tp: 200}
    listener.on_partitions_assigned([tp])
    assert tp not in stage._next
    assert lag() is None
    stage._next[tp] = 200
    assert lag() == 0


def test_a_worker_is_ready_from_its_first_assignment_even_an_empty_one() -> None:
    """An extra replica, given no partition, is ready (idle), and a worker that loses its
    partitions stays ready: a `maxSurge: 0` rollout waits for each new pod to be ready
    (deploy/k8s/README.md, "Scaling")."""
    from kafka import TopicPartition

    from driftline.consumers.embed_stage import _LogAssignments

    stage = EmbedStage(
        LagConsumer(), Producer(), events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(CollectorRegistry()))
    listener = _LogAssignments(stage)
    assert not stage.ready
    listener.on_partitions_assigned([])
    assert stage.ready
    tp = TopicPartition("ev", 0)
    listener.on_partitions_assigned([tp])
    listener.on_partitions_revoked([tp])
    assert stage.ready


def test_redis_unreachable_skips_the_cache_and_dead_letters_late_labels() -> None:
    """Redis refusing connections costs the embed stage at most ``redis_wait_s`` per call: the
    batch's slice-updates still go out, the prediction cache is skipped (counted), and a late
    label, which needs it, goes to the dead-letter topic as ``store_unavailable``."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    registry = CollectorRegistry()
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(registry), redis_client=store_client(f"redis://127.0.0.1:{port}/0"),
        redis_wait_s=0.3)
    values = [_event(0, "s1", embedding=[1.0, 0.0, 0.0]),
              _event(1, "s2", image=_jpeg((10, 200, 10))),
              json.dumps({"event_id": "e0", "ts": "2026-11-23T09:00:00Z", "station": "s1",
                          "shift": "day", "lot": "L1", "label": "scratch"}).encode()]
    started = time.monotonic()
    stage.process([Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    assert time.monotonic() - started < 5  # two calls of 0.3 s each, not redis-py's 8 s
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == ["e0", "e1"]
    dead = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [(2, "store_unavailable")]
    assert registry.get_sample_value("driftline_embed_redis_skipped_total") == 2


class _OverflowingEmbedder(Embedder):
    """Like a model exported in float16 that overflows on bright images."""

    def embed_images(self, sources: Sequence[ImageSource]) -> tuple[Any, list[Any]]:
        out, errors = super().embed_images(sources)
        out[out[:, 0] > 100] = np.inf
        return out, errors


def test_embeddings_that_are_not_finite_in_float32_are_dead_lettered_alone() -> None:
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=_OverflowingEmbedder(), reference=Reference(),
        templates=["station"], metrics=EmbedMetrics(CollectorRegistry()))
    values = [_event(0, "s1", embedding=[1e39, 0.0, 0.0]),  # finite, but not in float32
              _event(1, "s1", embedding=[3e38, 3e38, 0.0]),  # float32, its norm is not
              _event(2, "s1", image=_jpeg((250, 10, 10))),  # the model overflows
              _event(3, "s1", image=_jpeg((10, 10, 10)))]
    stage.process([Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    dead = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [(0, "invalid_field"),
                                                         (2, "embedding_not_finite")]
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == ["e1", "e3"]


class _FragileReference(Reference):
    """Breaks, as a library could on odd input, on embeddings with a large second value."""

    def assign(self, emb: Any) -> tuple[Any, Any]:
        if (np.asarray(emb)[:, 1] > 0.5).any():
            raise RuntimeError("index: unexpected input")
        return super().assign(emb)


def _fragile_stage(producer: Producer, registry: CollectorRegistry | None = None) -> EmbedStage:
    return EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=_FragileReference(),
        templates=["station"], metrics=EmbedMetrics(registry or CollectorRegistry()))


def test_an_event_that_breaks_the_batch_is_dead_lettered_and_the_rest_go_on() -> None:
    producer, registry = Producer(), CollectorRegistry()
    values = [_event(n, "s1", embedding=[1.0, 7.0 if n == 2 else 0.0, 0.0]) for n in range(4)]
    values.append(b"{not json")
    _fragile_stage(producer, registry).process_guarded(
        [Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    # the failed pass counted nothing: every event is counted once, by its replay
    value = registry.get_sample_value
    assert value("driftline_embed_events_total", {"kind": "inference"}) == 4
    assert value("driftline_embed_slice_updates_total") == 3
    assert value("driftline_embed_dead_letters_total", {"reason": "malformed_json"}) == 1
    assert value("driftline_embed_dead_letters_total", {"reason": "processing_failed"}) == 1
    dead = sorted((json.loads(v) for t, _, v in producer.sent if t == "dlq"),
                  key=lambda d: d["offset"])
    assert [(d["offset"], d["reason"]) for d in dead] == [(2, "processing_failed"),
                                                         (4, "malformed_json")]
    assert "RuntimeError: index: unexpected input" in dead[0]["detail"]
    # the failed batch sent nothing: each good event's update goes once
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == [
        "e0", "e1", "e3"]


@pytest.mark.parametrize("others", ["none", "labels"])
def test_events_failing_with_none_of_their_kind_going_through_stop_the_worker(
        others: str) -> None:
    """No other event of the same kind got through: the fault may be the worker's (a broken
    model session), so nothing is dead-lettered for it and the worker stops; a label going
    through says nothing about the model."""
    producer = Producer()
    values = [_event(n, "s1", embedding=[1.0, 7.0, 0.0]) for n in range(3)]
    if others == "labels":
        values += [json.dumps({"event_id": "old", "ts": "2026-11-23T09:00:00Z", "station": "s1",
                               "shift": "day", "lot": "L1", "label": "scratch"}).encode()]
    with pytest.raises(RuntimeError, match="the fault may be the worker's"):
        _fragile_stage(producer).process_guarded(
            [Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    assert [t for t, _, _ in producer.sent if t == "up"] == []


def _stage(producer: Producer) -> EmbedStage:
    return EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(CollectorRegistry()))


def _good_events(first: int) -> list[bytes]:
    return [_event(first, "s1", embedding=[1.0, 0.0, 0.0]),
            _event(first + 1, "s1", image=_jpeg((1, 2, 3)))]


# values that once escaped the parser (ValueError, RecursionError, OverflowError) and stopped
# the worker at their offset after every restart
_PARSER_BREAKERS = [
    (b'{"x": ' + b"1" * 5000 + b"}", "malformed_json"),  # past Python's int digit limit
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed_json"),
    (_event(0, "s1", embedding=[1.0, 0.0, 0.0]).replace(  # out of datetime's range in UTC
        b"2026-11-23T08:00:00Z", b"9999-12-31T23:30:00-01:00"), "invalid_field"),
]


@pytest.mark.parametrize("with_good", [False, True], ids=["alone", "with-good-events"])
@pytest.mark.parametrize(("bad", "reason"), _PARSER_BREAKERS,
                         ids=["long-int", "deep-nesting", "ts-overflow"])
def test_an_event_that_broke_the_parser_is_dead_lettered_and_the_poll_goes_on(
        bad: bytes, reason: str, with_good: bool) -> None:
    producer = Producer()
    values = [bad, *(_good_events(1) if with_good else [])]
    _stage(producer).process_guarded([Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    dead = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [(0, reason)]
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == (
        ["e1", "e2"] if with_good else [])


@pytest.mark.parametrize("with_good", [False, True], ids=["alone", "with-good-events"])
def test_a_parser_error_is_the_events_never_the_workers(
        monkeypatch: pytest.MonkeyPatch, with_good: bool) -> None:
    """Parsing depends on the bytes alone: whatever it raises, the event is dead-lettered as
    processing_failed, even with no other event in its poll."""
    from driftline.consumers import embed_stage

    poison = _event(0, "s1", embedding=[1.0, 0.0, 0.0])
    real = embed_stage.parse_event

    def parse(raw: bytes, **kw: Any) -> Any:
        if raw == poison:
            raise TypeError("parser bug on odd input")
        return real(raw, **kw)

    monkeypatch.setattr(embed_stage, "parse_event", parse)
    producer = Producer()
    values = [poison, *(_good_events(1) if with_good else [])]
    _stage(producer).process_guarded([Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    dead = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [(0, "processing_failed")]
    assert "TypeError: parser bug on odd input" in dead[0]["detail"]
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == (
        ["e1", "e2"] if with_good else [])


@pytest.mark.parametrize("with_good", [False, True], ids=["alone", "with-good-events"])
def test_image_uris_that_hung_or_broke_the_decoder_are_dead_lettered(
        tmp_path: Any, with_good: bool) -> None:
    """A NUL in the path made open() raise ValueError (alone in its poll: the worker stopped);
    a FIFO blocked a decode thread in open() for good."""
    import os
    import threading

    fifo = tmp_path / "frame.jpg"
    os.mkfifo(fifo)
    values = [_event(0, "s1", image_uri="file:///tmp/a%00b.jpg"),
              _event(1, "s1", image_uri=fifo.as_uri()),
              *(_good_events(2) if with_good else [])]
    producer = Producer()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _stage(producer).process_guarded(
                [Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # release the blocked decode before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("the stage blocked on a FIFO image_uri")
    assert errors == []
    dead = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [(0, "invalid_field"),
                                                         (1, "image_undecodable")]
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == (
        ["e2", "e3"] if with_good else [])


class SizeCheckingProducer(Producer):
    """Refuses a record larger than our producers' max_request_size, as kafka-python does."""

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
             headers: Any = None) -> None:
        from kafka.errors import MessageSizeTooLargeError
        from kafka.record.default_records import DefaultRecordBatchBuilder

        from driftline.consumers.kafka_io import PRODUCER_MAX_REQUEST_BYTES

        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or [])
        if size > PRODUCER_MAX_REQUEST_BYTES:
            raise MessageSizeTooLargeError(f"{size} bytes")
        super().send(topic, key, value, headers)


def test_a_rejected_event_too_large_for_the_dead_letter_topic_is_kept_in_part() -> None:
    """Dead-lettered whole, a rejected event over ~786 kB made a record the producer refused
    (a Kafka error: the worker stopped, and restarted at the same offset)."""
    import hashlib

    junk = base64.b64encode(b"\xff\xd8\xff" + b"\0" * 900_000).decode()  # undecodable
    values = [_event(0, "s1", image=junk),
              b"x" * (9 << 20),  # over max_event_bytes (8 MiB)
              b"{not json",
              *_good_events(3)]
    keys = [b"k", b"k", b"k" * (2 << 20), b"k", b"k"]  # a hostile key, twice in its record
    producer = SizeCheckingProducer()
    _stage(producer).process_guarded(
        [Msg("ev", 0, n, k, v) for n, (k, v) in enumerate(zip(keys, values, strict=True))])
    dead = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert [(d["offset"], d["reason"]) for d in dead] == [
        (0, "image_undecodable"), (1, "oversized_event"), (2, "malformed_json")]
    for d, value in zip(dead, values, strict=False):
        assert (d["value_bytes"], d["value_sha256"]) == (
            len(value), hashlib.sha256(value).hexdigest())
        assert value.startswith(base64.b64decode(d["value_b64"]))
    assert [(d["value_truncated"], d["key_truncated"]) for d in dead] == [
        (True, False), (True, False), (False, True)]
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == [
        "e3", "e4"]


# --- one batch ahead: the model embeds batch n while batch n - 1 is finished -----------------
class CommitLog:
    """What the loop's batch steps use of a consumer: explicit commits."""

    def __init__(self) -> None:
        self.commits: list[dict[int, int]] = []

    def commit(self, offsets: dict[Any, Any]) -> None:
        self.commits.append({tp.partition: om.offset for tp, om in offsets.items()})


class GatedEmbedder(Embedder):
    """Records the thread each call runs on; a call for an image of the ``hold`` colour waits
    until ``gate`` opens."""

    def __init__(self) -> None:
        import threading

        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []

    def embed_images(self, sources: Sequence[ImageSource]) -> tuple[Any, list[Any]]:
        import threading

        self.threads.append(threading.current_thread().name)
        out, errors = super().embed_images(sources)
        if (out[:, 2] > 150).any():  # the blue image: wait for the test
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return out, errors


def _ahead_stage(ahead: bool, embedder: Embedder | None = None,
                 registry: CollectorRegistry | None = None) -> tuple[EmbedStage, Producer,
                                                                      CommitLog]:
    producer, consumer = Producer(), CommitLog()
    stage = EmbedStage(
        consumer, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=embedder or Embedder(), reference=Reference(),
        templates=["station", "station+shift"],
        metrics=EmbedMetrics(registry or CollectorRegistry()), ahead=ahead)
    return stage, producer, consumer


def _polls() -> list[list[Msg]]:
    """Three polls over two partitions, images, embeddings, a bad image and bad JSON."""
    values = [_event(n, f"s{n % 3}", image=_jpeg((20 * n, 10, 10))) if n % 4 else
              _event(n, f"s{n % 3}", embedding=[1.0, float(n), 0.0]) for n in range(12)]
    values[5] = _event(5, "s2", image=base64.b64encode(b"\xff\xd8\xff broken").decode())
    values[9] = b"{not json"
    msgs = [Msg("ev", n % 2, n // 2, b"k", v) for n, v in enumerate(values)]
    return [msgs[0:5], msgs[5:8], msgs[8:12]]


def test_one_batch_ahead_sends_and_commits_what_the_serial_loop_does() -> None:
    outputs = {}
    for ahead in (False, True):
        registry = CollectorRegistry()
        stage, producer, consumer = _ahead_stage(ahead, registry=registry)
        commits_after: list[int] = []
        for poll in _polls():
            stage.advance(poll)
            commits_after.append(len(consumer.commits))
        stage.advance([])  # an empty poll finishes the batch in flight
        stage.drain()
        sent = [(t, k, {f: x for f, x in json.loads(v).items() if f not in ("time", "detail")})
                for t, k, v in producer.sent]  # no clock, no object addresses
        outputs[ahead] = (sent, consumer.commits, commits_after,
                          registry.get_sample_value("driftline_embed_slice_updates_total"),
                          registry.get_sample_value("driftline_embed_dead_letters_total",
                                                    {"reason": "image_undecodable"}))
    serial, ahead_ = outputs[False], outputs[True]
    assert ahead_[0] == serial[0] and len(serial[0]) == 2 * 10 + 2  # 10 good events, 2 dead
    assert ahead_[1] == serial[1] == [{0: 3, 1: 2}, {0: 4, 1: 4}, {0: 6, 1: 6}]
    assert serial[2] == [1, 2, 3]  # each batch committed as it is polled
    assert ahead_[2] == [0, 1, 2]  # each batch committed when the next one is polled
    assert ahead_[3] == serial[3] == 20 and ahead_[4] == serial[4] == 1


def test_the_model_embeds_the_next_batch_while_the_previous_one_finishes() -> None:
    import threading

    embedder = GatedEmbedder()
    stage, producer, consumer = _ahead_stage(True, embedder)
    first, second = _polls()[0], [Msg("ev", 0, 10, b"k", _event(10, "s1",
                                                                image=_jpeg((10, 10, 240))))]
    stage.advance(first)
    assert consumer.commits == [] and producer.sent == []  # in flight on the model thread
    stage.advance(second)  # finishes the first while the model holds the second
    assert embedder.entered.wait(10)
    assert consumer.commits == [{0: 3, 1: 2}]
    assert {json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"} == {
        "e0", "e1", "e2", "e3", "e4"}
    done = threading.Thread(target=stage.drain)
    done.start()
    done.join(0.3)
    assert done.is_alive()  # the drain waits for the model
    embedder.gate.set()
    done.join(10)
    assert consumer.commits[-1] == {0: 11}
    assert set(embedder.threads) == {"embed-model_0"}
    stage._model.shutdown()  # type: ignore[union-attr]


class Sent:
    """A producer's future for one record."""

    def __init__(self, error: Exception | None = None) -> None:
        self.exception = error

    def failed(self) -> bool:
        return self.exception is not None


class LoopProducer(Producer):
    """Records flushes in the consumer's log; records for ``failing`` topics fail."""

    def __init__(self, log: list[tuple[Any, ...]], failing: str | None = None) -> None:
        super().__init__()
        self.log, self.failing = log, failing

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"",
             headers: Any = None) -> Sent:  # type: ignore[override]
        super().send(topic, key, value, headers)
        return Sent(RuntimeError("record too large") if topic == self.failing else None)

    def flush(self) -> None:
        self.log.append(("flush", len(self.sent)))

    def close(self, timeout: float | None = None) -> None:
        pass


class ScriptedConsumer:
    """Enough of a KafkaConsumer for ``run``: scripted polls, a rejoin pending before the polls
    numbered in ``rejoin_before``, and the stage stopped by the poll that empties the script
    (or by the one numbered ``stop_at``)."""

    def __init__(self, polls: list[list[Msg]], rejoin_before: set[int] = frozenset(),  # type: ignore[assignment]
                 stop_at: int | None = None) -> None:
        import types

        self.polls, self.calls, self.stop_at = list(polls), 0, stop_at
        self.log: list[tuple[Any, ...]] = []
        self.stage: EmbedStage | None = None
        self._coordinator = types.SimpleNamespace(
            need_rejoin=lambda: self.calls in rejoin_before, _join_task=None)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1}

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Msg]]:
        from kafka import TopicPartition

        assert self.stage is not None
        self.log.append(("poll", timeout_ms))
        self.calls += 1
        msgs = self.polls.pop(0) if self.polls else []
        if not self.polls or self.calls == self.stop_at:
            self.stage.stop()
        out: dict[Any, list[Msg]] = {}
        for m in msgs:
            out.setdefault(TopicPartition(m.topic, m.partition), []).append(m)
        return out

    def assignment(self) -> set[Any]:
        return set()

    def highwater(self, tp: Any) -> int | None:
        return None

    def commit(self, offsets: dict[Any, Any]) -> None:
        self.log.append(("commit", {tp.partition: om.offset for tp, om in offsets.items()}))

    def close(self, autocommit: bool = False) -> None:
        self.log.append(("close",))


def _loop_stage(consumer: ScriptedConsumer, embedder: Embedder | None = None,
                failing: str | None = None, registry: CollectorRegistry | None = None,
                ) -> EmbedStage:
    stage = EmbedStage(
        consumer, LoopProducer(consumer.log, failing),  # type: ignore[arg-type]
        events_topic="ev", updates_topic="up", dlq_topic="dlq",
        embedder=embedder or Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(registry or CollectorRegistry()), ahead=True)
    consumer.stage = stage
    return stage


def test_the_loop_commits_each_batch_after_its_flush_and_before_a_pending_rejoin() -> None:
    """kafka-python revokes inside ``poll`` on its network thread, where nothing can be
    committed: with a rejoin pending, the batch in flight is finished and committed first,
    and that poll may then wait."""
    first, second, _ = _polls()
    consumer = ScriptedConsumer([first, second, []], rejoin_before={1})
    _loop_stage(consumer).run()
    assert consumer.log == [
        ("poll", 200),  # nothing in flight: it may wait
        ("flush", 5), ("commit", {0: 3, 1: 2}),  # the rejoin pending: the first batch done
        ("poll", 200),
        ("poll", 0),  # the second in flight: it must not wait
        ("flush", 8), ("commit", {0: 4, 1: 4}),  # (one event of it is dead-lettered)
        ("flush", 8), ("close",)]
    plain = ScriptedConsumer([first, second, []])
    _loop_stage(plain).run()  # no rejoin: the first is finished while the second embeds
    assert plain.log == [("poll", 200), ("poll", 0), ("flush", 5), ("commit", {0: 3, 1: 2}),
                         ("poll", 0), ("flush", 8), ("commit", {0: 4, 1: 4}), ("flush", 8),
                         ("close",)]


def test_a_stop_finishes_and_commits_the_batch_in_flight() -> None:
    consumer = ScriptedConsumer([_polls()[0], _polls()[1]], stop_at=1)
    _loop_stage(consumer).run()
    assert consumer.log == [("poll", 200), ("flush", 5), ("commit", {0: 3, 1: 2}), ("flush", 5),
                            ("close",)]


def test_an_undelivered_record_stops_the_worker_before_its_batch_is_committed() -> None:
    """``flush`` returns once every record is delivered or failed; a failed one (the
    dead-letter record here) must not be committed over: the worker stops, its restart reads
    the batch again."""
    from kafka.errors import KafkaError

    consumer = ScriptedConsumer([_polls()[1], []])
    with pytest.raises(KafkaError, match="not delivered"):
        _loop_stage(consumer, failing="dlq").run()
    assert [e for e in consumer.log if e[0] == "commit"] == []
    assert consumer.log[-1] == ("close",)


def test_a_revoke_leaves_the_batch_in_flight_to_the_loop() -> None:
    """The callback runs on kafka-python's network thread: it must not finish or commit."""
    from kafka import TopicPartition

    from driftline.consumers.embed_stage import _LogAssignments

    stage, producer, consumer = _ahead_stage(True)
    stage.advance(_polls()[0])
    _LogAssignments(stage).on_partitions_revoked([TopicPartition("ev", 0)])
    assert consumer.commits == [] and stage._inflight is not None
    stage.drain()
    assert consumer.commits == [{0: 3, 1: 2}]


def test_embed_latency_is_the_models_time_not_the_wait_for_it_too() -> None:
    import time as _time

    class Slow(Embedder):
        def embed_images(self, sources: Sequence[ImageSource]) -> tuple[Any, list[Any]]:
            _time.sleep(0.3)
            return super().embed_images(sources)

    registry = CollectorRegistry()
    stage, _, _ = _ahead_stage(True, Slow(), registry)
    stage.advance(_polls()[0])
    stage.drain()  # waits ~0.3 s for the model, which took ~0.3 s
    total = registry.get_sample_value("driftline_embed_latency_seconds_sum")
    assert total is not None and 0.3 <= total < 0.5


def test_a_batch_that_fails_on_the_model_thread_is_replayed_one_event_at_a_time() -> None:
    """A fault on the model thread reaches the main thread when the batch is finished; the
    batch is then processed one event at a time, as a serial one would be."""
    producer, registry = Producer(), CollectorRegistry()

    class Picky(Embedder):  # fails on batches, not on single images (a library bug)
        def embed_images(self, sources: Sequence[ImageSource]) -> tuple[Any, list[Any]]:
            if len(sources) > 1:
                raise ValueError("model: batch dimension rejected")
            return super().embed_images(sources)

    stage = EmbedStage(
        CommitLog(), producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Picky(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(registry), ahead=True)
    values = [_event(n, "s1", image=_jpeg((50 * n, 10, 10))) for n in range(3)]
    stage.advance([Msg("ev", 0, n, b"k", v) for n, v in enumerate(values)])
    stage.drain()
    sent = [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"]
    dead = [(json.loads(v)["offset"], json.loads(v)["reason"]) for t, _, v in producer.sent
            if t == "dlq"]
    assert sent == ["e0", "e1", "e2"] and dead == []
    # the failed pass counted nothing: each event is counted once, by its replay
    assert registry.get_sample_value("driftline_embed_events_total",
                                     {"kind": "inference"}) == 3
    assert registry.get_sample_value("driftline_embed_batch_size_events_count") == 3


class PrefetchingEmbedder(Embedder):
    """Records the prefetches the stage asks for and what each call gets."""

    def __init__(self) -> None:
        self.prefetched: list[int] = []
        self.given: list[object] = []

    def prefetch(self, sources: Sequence[ImageSource]) -> object:
        self.prefetched.append(len(sources))
        return ("early", id(sources))

    def embed_images(self, sources: Sequence[ImageSource],  # type: ignore[override]
                     prefetched: object = None) -> tuple[Any, list[Any]]:
        self.given.append(prefetched)
        return super().embed_images(sources)


@pytest.mark.parametrize("ahead", [True, False])
def test_one_batch_ahead_prefetches_each_polls_first_images(ahead: bool) -> None:
    embedder = PrefetchingEmbedder()
    stage, producer, _ = _ahead_stage(ahead, embedder)
    first, second, _ = _polls()
    stage.advance(first)
    stage.advance(second)
    stage.drain()
    if ahead:  # each poll's images (the undecodable one too): 3 and 3
        assert embedder.prefetched == [3, 3]
        assert [g[0] for g in embedder.given] == ["early", "early"]  # type: ignore[index]
    else:  # every core in onnxruntime: nothing beside the model
        assert embedder.prefetched == [] and embedder.given == [None, None]
    assert len([t for t, _, _ in producer.sent if t == "up"]) == 2 * 7


def test_an_event_dated_ahead_of_its_record_is_dead_lettered() -> None:
    """The detect stage's clock is event time: one event a year ahead would retire every slice
    of its partition and refuse every later event as too old. Ahead of the record's Kafka
    timestamp by more than a day: refused, naming the sender's clock; within (a sender writing
    local time as UTC is 14 h ahead at most): counted."""
    producer = Producer()
    stage = EmbedStage(
        None, producer, events_topic="ev", updates_topic="up",  # type: ignore[arg-type]
        dlq_topic="dlq", embedder=Embedder(), reference=Reference(), templates=["station"],
        metrics=EmbedMetrics(CollectorRegistry()))
    sent_at = int(datetime(2026, 11, 23, 8, 0, tzinfo=UTC).timestamp() * 1000)
    stage.process([
        Msg("ev", 0, 0, b"k", json.dumps({
            "event_id": "ahead", "ts": "2027-11-23T08:00:00Z", "station": "s1", "shift": "A",
            "lot": "L1", "embedding": [1.0, 0.0, 0.0]}).encode(), sent_at),
        Msg("ev", 0, 1, b"k", json.dumps({
            "event_id": "skewed", "ts": "2026-11-23T22:00:00Z", "station": "s1", "shift": "A",
            "lot": "L1", "embedding": [1.0, 0.0, 0.0]}).encode(), sent_at)])
    (dead,) = [json.loads(v) for t, _, v in producer.sent if t == "dlq"]
    assert dead["reason"] == "invalid_field" and dead["offset"] == 0
    assert "8760.0 h after the record's timestamp" in dead["detail"]
    assert [json.loads(v)["event_id"] for t, _, v in producer.sent if t == "up"] == ["skewed"]
