"""Embed stage: events → one compact slice-update per monitored slice.

Stateless apart from a short-lived prediction cache in Redis (for late labels), so it scales by
adding consumers to the ``driftline-embed`` group. Per batch:

1. poll up to ``POLL_BATCHES × batch_size`` events (waiting at most ``batch_timeout``);
2. validate each; a bad one goes to the dead-letter topic with its reason;
3. embed images in one model call (precomputed embeddings skip the model), assign each to its
   nearest reference cluster and measure its distance to the reference (OOD flag);
4. store each inference event's prediction under its ``event_id`` with the position it was
   read at, skipping an event whose id another position stored (a sender's retry: the detect
   stage could not tell it from a new event), and produce one slice-update per slice template,
   keyed by slice id, carrying the source partition/offset (the detect stage skips replays by
   it);
5. flush the producer, then commit the batch's input offsets (at-least-once; duplicates are
   harmless).

When onnxruntime leaves a core free (fewer intra-op threads than usable CPUs, the configuration
for CPU-only hosts: one worker per core), the loop runs **one batch ahead**: the model embeds
batch *n* on its own thread while the main thread finishes batch *n − 1* (steps 4–5, the Redis
writes) and polls and validates batch *n + 1* (steps 1–2). Each batch's offsets are committed
explicitly once its updates are flushed and delivered, so offsets polled but not yet finished are
never committed. Before a poll that could rejoin the group (a rebalance is pending), and at a
stop, the batch in flight is finished and committed first: kafka-python revokes partitions inside
``poll``, on its network thread, where nothing can be committed, and a batch finished after the
rebalance could not commit (its next owner would read it again; harmless, as the detect stage
skips replays, but avoidable). With every core in onnxruntime the loop stays serial: work beside
the model would preempt its threads.

Redis holds only the prediction cache and the recent-embeddings buffer, so an outage does not
stop the stream: each write waits ``redis_wait_s`` at most and is then skipped (logged; late
labels for those events will find no prediction, and their ids are not checked for
duplicates), and a late label that cannot be looked up goes to the dead-letter topic as
``store_unavailable``, to be replayed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import faiss
import numpy as np
import redis
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from driftline.consumers.checkpoint import REDIS_ERRORS, RedisOutage, retry_redis
from driftline.consumers.imaging import Base64Image, ImageError, ImageSource
from driftline.consumers.kafka_io import (
    DLQ_MAX_KEY_BYTES,
    DLQ_MAX_VALUE_BYTES,
    JoinWatch,
    ProgressLog,
    subscribe_when_ready,
)
from driftline.metrics import ConsumerMetrics, EmbedMetrics
from driftline.reference.index import unit_embeddings
from driftline.schema import (
    LATENCY_SAMPLE_EVERY,
    SOURCE_TS_HEADER,
    DeadLetter,
    Event,
    EventRejected,
    RejectReason,
    SliceUpdate,
    parse_event,
    slice_id,
)

log = logging.getLogger(__name__)
# Failures of the worker, not of an event: never dead-letter events over them.
STAGE_FATAL = (KafkaError, MemoryError)

# Late labels arrive within hours in a plant; a week covers weekend relabelling campaigns.
# The default of DRIFTLINE_LATE_LABEL_HOURS: one key per inference event, so Redis holds
# ~1.5 MB per event/s per hour of it (benchmarks/results/soak.md).
PREDICTION_TTL_S = 7 * 24 * 3600
# An event dated further ahead of its Kafka record's timestamp is refused (see _not_ahead): a
# day, beyond any time zone a sender could have mislabelled as UTC (+14 h) — a stream whose
# clock is consistently a few hours off still counts, the detect stage compares event times
# with each other — but well within the 14 days a partition's clock may jump before its
# slices look idle.
MAX_AHEAD_S = 86400.0
# An event that fails alone, with no event of its kind going through, stops the worker (the
# fault may be the worker's); its failures are counted in Redis, across restarts, per position,
# and at the POISON_STRIKES-th it is taken for a poison event and dead-lettered (after
# POISON_STRIKES - 1 stops), so that it cannot stall its partition for good — unless the poison
# event declared before it on the same partition was followed by no event that went through: a
# run of "poison" events is a broken worker (a model session that fails on everything), whose
# events must stay in Kafka. A day bounds these marks' life.
POISON_STRIKES = 3
POISON_STRIKE_TTL_S = 86400
RECENT_KEY = "dl:recent"
# Lag gauges (read from the last fetch responses) once a second are plenty for an alert.
LAG_REPORT_S = 1.0
# Under a backlog one poll takes this many model batches, so that the embedder can decode the next
# batch while the model runs one (when onnxruntime leaves a core free, of bare onnxruntime at one
# intra-op thread: 0.76 per batch, 0.87 per poll, 0.91-0.92 with the loop one poll ahead and each
# poll's first batch prefetched); quiet streams still get small, prompt batches.
POLL_BATCHES = 4


class EmbedderLike(Protocol):
    dim: int

    def embed_images(self, sources: Sequence[ImageSource]) -> tuple[Any, list[Any]]: ...


class ReferenceLike(Protocol):
    dim: int

    @property
    def reference_id(self) -> str: ...

    def assign(self, emb: Any) -> tuple[Any, Any]: ...

    def baseline_for(self, station: str, shift: str) -> Any: ...


@dataclass
class _Item:
    msg: Any
    event: Event
    cluster: int | None = None
    distance: float | None = None
    ood: bool | None = None
    ood_p0: float | None = None


Held = tuple[tuple[int, int], str, dict[str, Any]]  # (source partition, offset), topic, record
Embedded = tuple[Any, list[Any], float]  # embed_images' (embeddings, errors), model seconds


@dataclass
class _Batch:
    """One polled batch, from :meth:`EmbedStage._start` (validated, handed to the model) to
    :meth:`EmbedStage._complete` (embedded, sent, counted)."""

    msgs: Sequence[Any]
    items: list[_Item] = field(default_factory=list)  # inference events
    labels: list[_Item] = field(default_factory=list)  # late labels
    embedded: Future[Embedded] | None = None  # the images of ``items``, in order
    held: list[Held] = field(default_factory=list)  # its sends, made once it is done
    counts: list[tuple[Callable[[float], None], float]] = field(default_factory=list)
    failed: bool = False  # starting it raised: it is processed one event at a time

    def offsets(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """The offsets to commit once the batch is done: one past its last event per
        partition."""
        ends: dict[TopicPartition, int] = {}
        for m in self.msgs:
            tp = TopicPartition(m.topic, m.partition)
            ends[tp] = max(ends.get(tp, 0), m.offset + 1)
        return {tp: OffsetAndMetadata(end, "", -1) for tp, end in ends.items()}


class EmbedStage:
    """Runs the embed loop for one worker of the ``driftline-embed`` group."""

    def __init__(
        self, consumer: KafkaConsumer, producer: KafkaProducer, *, events_topic: str,
        updates_topic: str, dlq_topic: str, embedder: EmbedderLike | None,
        reference: ReferenceLike, templates: Sequence[str], metrics: EmbedMetrics,
        redis_client: redis.Redis | None = None, consumer_metrics: ConsumerMetrics | None = None,
        batch_size: int = 32,
        batch_timeout_ms: int = 200, max_event_bytes: int = 8 << 20, recent_size: int = 5000,
        latency_sample_every: int = LATENCY_SAMPLE_EVERY, redis_wait_s: float = 2.0,
        ahead: bool | None = None, prediction_ttl_s: int = PREDICTION_TTL_S,
    ) -> None:
        self.consumer, self.producer = consumer, producer
        self.prediction_ttl_s = prediction_ttl_s  # a late label's window (_claim)
        self._next: dict[Any, int] = {}  # partition -> next offset to process (for lag)
        self.events_topic, self.updates_topic, self.dlq_topic = (
            events_topic, updates_topic, dlq_topic)
        self.embedder, self.reference, self.templates = embedder, reference, list(templates)
        self.metrics, self.redis = metrics, redis_client
        self.wait_s = redis_wait_s  # how long @retry_redis methods retry an unreachable Redis
        self.outage = RedisOutage("embed")
        self._last_lag = 0.0
        self.batch_size, self.batch_timeout_ms = batch_size, batch_timeout_ms
        self.max_event_bytes = max_event_bytes
        self.recent_size = recent_size
        self.stop_event = threading.Event()
        self.beat = time.monotonic()  # last turn of run()'s loop (see Service.liveness)
        self.assigned_once = threading.Event()
        self._tally = _Tally()
        # partitions whose poison mark this process cleared (an event went through)
        self._poison_cleared: set[tuple[str, int]] = set()
        self.progress = ProgressLog("embed", metrics=consumer_metrics)
        self.join_watch = JoinWatch("embed", metrics=consumer_metrics)
        self.latency_sample_every, self._sent = latency_sample_every, 0
        self._batch: _Batch | None = None  # the batch being started or completed
        # one batch ahead (module docstring): by default when onnxruntime leaves a core free
        if ahead is None:
            ahead = embedder is not None and bool(getattr(embedder, "overlap_decode", False))
        self._model = (ThreadPoolExecutor(1, thread_name_prefix="embed-model")
                       if ahead and embedder is not None else None)
        self._inflight: _Batch | None = None
        self._sent_records: list[Any] = []  # producer futures since the last commit
        # faiss splits each small search over an OpenMP team whose spin-waits fight onnxruntime's
        # threads for the same cores: ~20 ms instead of ~1 ms per batch of 32 on two busy cores
        faiss.omp_set_num_threads(1)

    def run(self) -> None:
        """Process batches until :meth:`stop`; the last batch is finished and committed."""
        faiss.omp_set_num_threads(1)  # OpenMP settings are per thread: set it where we search
        self._subscribe()
        log.info("embed loop started, one batch ahead" if self._model is not None else
                 "embed loop started, serial (onnxruntime has every core)")
        try:
            while not self.stop_event.is_set():
                self.beat = time.monotonic()  # liveness: the loop turns
                if self._inflight is not None and _rejoin_pending(self.consumer):
                    self.drain()  # commit it while the partitions are still ours
                # a batch in flight is finished as soon as nothing more is waiting
                polled = self.consumer.poll(
                    timeout_ms=0 if self._inflight is not None else self.batch_timeout_ms,
                    max_records=POLL_BATCHES * self.batch_size)
                self.join_watch.check(self.consumer)
                msgs = [m for part in polled.values() for m in part]
                for tp, part in polled.items():
                    if part:
                        self._next[tp] = part[-1].offset + 1
                if msgs:
                    self.progress.count(len(msgs))
                self.advance(msgs)
                self._report_lag()
            self.drain()  # a stop finishes the batch in flight
        finally:
            self._inflight = None  # after an error: not committed, read again by the next owner
            if self._model is not None:
                self._model.shutdown(wait=True)
            self.producer.flush()
            self.producer.close(timeout=10)  # the stage owns it: its sender thread ends too
            self.consumer.close(autocommit=False)

    def advance(self, msgs: Sequence[Any]) -> None:
        """Take one polled batch (possibly empty) and finish one: the batch itself when the
        loop is serial; the batch before it when it runs one batch ahead, so that the model
        embeds ``msgs`` meanwhile. A finished batch is flushed and its offsets committed."""
        batch = self._start_guarded(msgs) if msgs else None
        if self._model is not None:
            batch, self._inflight = self._inflight, batch
        if batch is not None:
            self._finish(batch)

    def drain(self) -> None:
        """Finish, flush and commit the batch in flight, if any."""
        batch, self._inflight = self._inflight, None
        if batch is not None:
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        self._complete_guarded(batch)
        self.producer.flush()
        sent, self._sent_records = self._sent_records, []
        for record in sent:  # flush returns once each record is delivered *or* failed
            if record is not None and record.failed():
                raise KafkaError(  # the worker restarts and reads the batch again
                    f"a record of the batch ending at {batch.offsets()} was not delivered; "
                    "its offsets are not committed") from record.exception
        self._commit(batch.offsets())

    def _subscribe(self) -> None:
        subscribe_when_ready(self.consumer, self.events_topic, _LogAssignments(self))

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def ready(self) -> bool:
        """The worker has joined its group once (ready even if given no partition: an
        extra replica is idle, not broken); it stays ready."""
        return self.assigned_once.is_set()

    def _report_lag(self) -> None:
        """Consumer lag per assigned partition and the progress log, at most every
        ``LAG_REPORT_S``."""
        now = time.monotonic()
        if now - self._last_lag < LAG_REPORT_S:
            return
        self._last_lag = now
        assigned = {tp.partition for tp in self.consumer.assignment()}
        positions: dict[int, int | None] = {p: None for p in assigned}
        positions.update({tp.partition: n for tp, n in self._next.items()
                          if tp.partition in assigned})
        self.progress.report(self.consumer, self.events_topic, positions)

    def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit a finished batch's input offsets; a failure (broker restarting, rebalance)
        only means the batch is read again, and the detect stage skips its replayed updates by
        source offset."""
        try:
            self.consumer.commit(offsets)
        except Exception as exc:
            log.warning("offset commit failed; the batch may be replayed",
                        extra={"error": repr(exc)})

    # --- one batch -----------------------------------------------------------------------
    def process_guarded(self, msgs: Sequence[Any]) -> None:
        """:meth:`process`, guarded against an event that breaks it in an unforeseen way (a
        bug, a library error on odd input), which would otherwise stop the worker on the same
        offset after every restart. The failed batch sent nothing; it is processed again one
        event at a time. An event that fails alone goes to the dead-letter topic as
        ``processing_failed`` with its error only if another event of its kind (image,
        precomputed embedding, label) went through: otherwise the fault may be the worker's
        (a broken model session), and the error stops the worker so that its supervisor
        restarts it — as Kafka errors do. Such failures are counted per event in Redis: at
        the ``POISON_STRIKES``-th on the same event it is dead-lettered too (a poison event,
        not the worker), so that it cannot hold its partition for good — unless the poison
        event declared before it on the partition was followed by no event that went
        through, which says the worker is broken: then it stays in Kafka and the worker
        keeps stopping. The failed pass counted nothing either."""
        self._complete_guarded(self._start_guarded(msgs))

    def _start_guarded(self, msgs: Sequence[Any]) -> _Batch:
        try:
            return self._start(msgs)
        except STAGE_FATAL:
            raise
        except Exception:
            log.exception("batch failed; processing its events one at a time",
                          extra={"events": len(msgs)})
            return _Batch(msgs, failed=True)

    def _complete_guarded(self, batch: _Batch) -> None:
        if not batch.failed:
            try:
                self._complete(batch)
                self._went_through(batch.msgs)
                return
            except STAGE_FATAL:
                raise
            except Exception:
                log.exception("batch failed; processing its events one at a time",
                              extra={"events": len(batch.msgs)})
        self._one_at_a_time(batch.msgs)

    def _one_at_a_time(self, msgs: Sequence[Any]) -> None:
        failed: list[tuple[Any, Exception]] = []
        worked: set[str] = set()
        for msg in msgs:
            try:
                self.process([msg])
                worked.add(self._kind(msg))
                self._went_through([msg])
            except STAGE_FATAL:
                raise
            except Exception as exc:  # noqa: BLE001 - judged below
                failed.append((msg, exc))
        poison: set[int] = set()
        for msg, cause in failed:  # in offset order: each unexplained one in turn
            if self._kind(msg) in worked:
                continue
            where = f"event at {msg.topic}[{msg.partition}]@{msg.offset}"
            strikes = self._strike(msg)
            if strikes < POISON_STRIKES:
                raise RuntimeError(
                    f"{where} fails alone and no other {self._kind(msg)} event of its batch "
                    f"went through: the fault may be the worker's (failure {strikes} of "
                    f"{POISON_STRIKES} on this event; at the last it is dead-lettered)") from cause
            if not self._declare_poison(msg):
                raise RuntimeError(
                    f"{where} failed alone {strikes} times, but so did the event declared "
                    "poison before it on this partition, and no event went through since: the "
                    "worker, not the events, is likely at fault (its model or reference); "
                    "nothing more is dead-lettered until an event goes through") from cause
            log.error("event failed alone %d times: dead-lettered as a poison event", strikes,
                      extra={"topic": msg.topic, "partition": msg.partition,
                             "offset": msg.offset})
            poison.add(id(msg))
        for msg, error in failed:
            self.metrics.events_in.labels("label" if self._kind(msg) == "label"
                                          else "inference").inc()
            self._release(msg)
            detail = f"{type(error).__name__}: {error}"
            if id(msg) in poison:
                detail = (f"failed alone {POISON_STRIKES} times ({POISON_STRIKES - 1} worker "
                          f"stops): {detail}")
            self._dead_letter(msg, EventRejected(RejectReason.processing_failed, detail))

    def _declare_poison(self, msg: Any) -> bool:
        """Mark ``msg``'s partition as having a poison event (``dl:embed:poisoned:{topic}:
        {partition}``) unless it has one already that no event went through after; False then
        (and without Redis)."""
        if self.redis is None:
            return False
        where = (msg.topic, msg.partition)
        try:
            fresh = self.redis.set(f"dl:embed:poisoned:{where[0]}:{where[1]}", msg.offset,
                                   nx=True, ex=POISON_STRIKE_TTL_S)
        except REDIS_ERRORS as exc:
            log.warning("cannot mark a poison event", extra={"error": repr(exc)})
            return False
        if fresh:
            self._poison_cleared.discard(where)
        return bool(fresh)

    def _went_through(self, msgs: Sequence[Any]) -> None:
        """Events of these partitions went through: a poison event declared on one of them
        before was the event's fault, so the next may be too (once per partition and process,
        and again after each poison event this process declares)."""
        fresh = {(m.topic, m.partition) for m in msgs} - self._poison_cleared
        if not fresh or self.redis is None:
            return
        try:
            self.redis.delete(*(f"dl:embed:poisoned:{t}:{p}" for t, p in fresh))
        except REDIS_ERRORS as exc:
            log.warning("cannot clear a poison mark", extra={"error": repr(exc)})
            return
        self._poison_cleared |= fresh

    def _strike(self, msg: Any) -> int:
        """Count one more failure of ``msg`` alone
        (``dl:embed:strike:{topic}:{partition}:{offset}``); with no Redis to count in, 1: the
        worker stops, as before failures were counted."""
        if self.redis is None:
            return 1
        key = f"dl:embed:strike:{msg.topic}:{msg.partition}:{msg.offset}"
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, POISON_STRIKE_TTL_S)
            return int(pipe.execute()[0])
        except REDIS_ERRORS as exc:
            log.warning("cannot count the failures of an event", extra={"error": repr(exc)})
            return 1

    def _kind(self, msg: Any) -> str:
        event = self._parse(msg, quiet=True)
        if isinstance(event, EventRejected):
            return "rejected"
        if event.kind != "inference":
            return "label"
        return "embedding" if event.embedding is not None else "image"

    def _parse(self, msg: Any, *, quiet: bool = False) -> Event | EventRejected:
        """The event, or why it goes to the dead-letter topic. Parsing depends on the bytes
        alone, so any error it raises (a parser bug on odd input) is the event's fault:
        ``processing_failed``, logged with its traceback unless ``quiet``. Raising instead
        would stop the worker at this offset after every restart."""
        try:
            return _not_ahead(parse_event(msg.value, max_bytes=self.max_event_bytes), msg)
        except EventRejected as exc:
            return exc
        except STAGE_FATAL:
            raise
        except Exception as exc:  # noqa: BLE001 - the event's, see above
            if not quiet:
                log.exception("parsing an event failed unexpectedly; dead-lettering it",
                              extra={"partition": msg.partition, "offset": msg.offset})
            return EventRejected(RejectReason.processing_failed,
                                 f"{type(exc).__name__}: {exc}"[:2000])

    def process(self, msgs: Sequence[Any]) -> None:
        """Steps 2–4 of the module docstring for one polled batch. What it produces is held
        until the batch is done, then sent in source order (partition, offset): late labels
        are looked up after the batch's inference events, and the detect stage, which skips
        an update at or below a slice's highest applied source offset, would take a label
        sent after a later event for a replay. A batch that fails sends nothing and counts
        nothing (its one-at-a-time replay counts its events once)."""
        self._complete(self._start(msgs))

    def _start(self, msgs: Sequence[Any]) -> _Batch:
        """Validate a batch and hand its images to the model (on the model thread when the
        loop runs one batch ahead, at once otherwise)."""
        batch = _Batch(msgs)
        self._batch = batch
        try:
            self._count(self.metrics.batch_size.observe, len(msgs))
            invalid = 0
            for msg in msgs:
                event = self._parse(msg)
                if isinstance(event, EventRejected):
                    self._dead_letter(msg, event)
                    invalid += 1
                    continue
                (batch.items if event.kind == "inference" else batch.labels).append(
                    _Item(msg, event))
            # every record counts once, so dead letters are a part of events_total
            for kind, n in (("inference", len(batch.items)), ("label", len(batch.labels)),
                            ("invalid", invalid)):
                if n:
                    self._count(self.metrics.events_in.labels(kind).inc, n)
            sources: list[ImageSource] = [  # base64 is decoded by the decode threads
                Base64Image(i.event.image) if i.event.image is not None
                else i.event.image_uri or b"" for i in batch.items if i.event.embedding is None]
            if sources and self.embedder is not None:
                # one batch ahead: the first images decode on the free core while the model
                # still embeds the batch before
                prefetch = getattr(self.embedder, "prefetch", None)
                early = prefetch(sources) if prefetch is not None and self._model else None
                batch.embedded = self._embed_images(self.embedder, sources, early)
        finally:
            self._batch = None
        return batch

    def _embed_images(self, embedder: EmbedderLike, sources: list[ImageSource],
                      early: Any) -> Future[Embedded]:
        if self._model is not None:
            return self._model.submit(_timed_embed, embedder, sources, early)
        done: Future[Embedded] = Future()
        done.set_result(_timed_embed(embedder, sources, early))  # errors raise: a failed start
        return done

    def _complete(self, batch: _Batch) -> None:
        """Take a started batch's embeddings, then steps 3–4 of the module docstring; its
        sends and metric counts are made once it is done."""
        self._batch = batch
        try:
            self._complete_batch(batch)
        except BaseException:
            self._tally = _Tally()
            raise
        finally:
            self._batch = None
        for _, topic, record in sorted(batch.held, key=lambda h: h[0]):  # stable: templates
            self._sent_records.append(self.producer.send(topic, **record))
        for op, value in batch.counts:
            op(value)
        self._tally.flush(self.metrics)

    def _count(self, op: Callable[[float], None], value: float) -> None:
        """A metric's ``inc``/``observe``, or held until the batch is done, as sends are."""
        if self._batch is None:
            op(value)
        else:
            self._batch.counts.append((op, value))

    def _complete_batch(self, batch: _Batch) -> None:
        model_s = 0.0
        embedded: tuple[Any, list[Any]] | None = None
        if batch.embedded is not None:
            emb, errors, model_s = batch.embedded.result()
            embedded = emb, errors
        started = time.perf_counter()  # after the wait: the model's own time is model_s
        items, vectors = self._embed(batch.items, embedded)
        if items:
            self._count(self.metrics.embed_latency.observe,
                        model_s + time.perf_counter() - started)
        try:
            fresh = self._claim(items)
        except REDIS_ERRORS as exc:
            fresh = None
            self._count(self.metrics.redis_skipped.inc, len(items))
            self.outage.down("predictions for late labels and recent embeddings not stored, "
                             "event ids not checked for duplicates", exc, events=len(items))
        if fresh is not None and not all(fresh):
            dups = [item.event.event_id for item, new in zip(items, fresh, strict=True) if not new]
            self._count(self.metrics.duplicate_events.inc, len(dups))
            log.info("duplicate events skipped: their ids were read before at another position",
                     extra={"events": len(dups), "first": dups[0]})
            kept = [n for n, new in enumerate(fresh) if new]
            items, vectors = [items[n] for n in kept], vectors[kept]
        for item in items:
            self._emit(item, item.event.label, item.event.loss, _error_of(item.event))
        if fresh is not None:
            try:
                self._remember(items, vectors)
                self.outage.up()
            except REDIS_ERRORS as exc:
                self._count(self.metrics.redis_skipped.inc, len(items))
                self.outage.down("recent embeddings not stored", exc, events=len(items))
        for item in batch.labels:
            try:
                self._emit_late_label(item)
            except REDIS_ERRORS as exc:
                self.outage.down("late labels dead-lettered as store_unavailable", exc)
                self._dead_letter(item.msg, EventRejected(
                    RejectReason.store_unavailable,
                    f"Redis unreachable, the prediction of {item.event.event_id!r} could "
                    "not be read; replay this label"), item.event.event_id)

    def _embed(self, items: list[_Item], embedded: tuple[Any, list[Any]] | None,
               ) -> tuple[list[_Item], np.ndarray]:
        """Vectors of a batch's inference events: the model's for images (``embedded``, in
        the order of the images among ``items``), the event's own (normalised) otherwise;
        each assigned to its nearest reference cluster."""
        images = [i for i in items if i.event.embedding is None]
        vectors = np.zeros((len(items), self.reference.dim), np.float32)
        ok = [True] * len(items)
        index = {id(item): n for n, item in enumerate(items)}
        if images and embedded is None:
            for item in images:
                ok[index[id(item)]] = False
                self._dead_letter(item.msg, EventRejected(
                    RejectReason.unknown_reference,
                    "the active reference was built from precomputed embeddings; send "
                    "`embedding`, or build a reference with an ONNX model to embed images"),
                    item.event.event_id)
        elif images and embedded is not None:
            emb, errors = embedded
            for item, row, err in zip(images, emb, errors, strict=True):
                n = index[id(item)]
                if err is not None:
                    ok[n] = False
                    self._dead_letter(item.msg, _rejection(err), item.event.event_id)
                else:
                    vectors[n] = row
        own: list[int] = []  # events with an embedding of the reference's dimension
        for n, item in enumerate(items):
            vec = item.event.embedding
            if vec is None:
                continue
            if len(vec) != self.reference.dim:
                ok[n] = False
                self._dead_letter(item.msg, EventRejected(
                    RejectReason.embedding_dim,
                    f"embedding has {len(vec)} dimensions, the reference {self.reference.dim}"),
                    item.event.event_id)
                continue
            own.append(n)
        if own:  # normalised once for the batch, as the reference build does
            vectors[own] = unit_embeddings([items[n].event.embedding for n in own])
        for n in np.flatnonzero(~np.isfinite(vectors).all(axis=1)).tolist():
            if ok[n]:  # e.g. a model exported in float16 overflowing on some input
                ok[n] = False
                self._dead_letter(items[n].msg, EventRejected(
                    RejectReason.embedding_not_finite,
                    "the model's embedding of this image holds NaN or infinite values"),
                    items[n].event.event_id)
        kept = [n for n in range(len(items)) if ok[n]]
        if kept:
            clusters, dists = self.reference.assign(vectors[kept])
            for n, c, d in zip(kept, clusters, dists, strict=True):
                items[n].cluster, items[n].distance = int(c), float(d)
        return [items[n] for n in kept], vectors[kept]

    def _emit(self, item: _Item, label: str | None, loss: float | None,
              error: bool | None, *, late: bool = False, reference_id: str | None = None
              ) -> None:
        """One slice-update per template; ``reference_id``: the reference its cluster comes
        from, if not the active one (a late label whose event was embedded before an
        activation: the detect stage skips it, as every update of another reference)."""
        ev, msg = item.event, item.msg
        base = self.reference.baseline_for(ev.station, ev.shift)
        ood = None if item.distance is None else bool(item.distance > base.ood_threshold)
        item.ood, item.ood_p0 = ood, base.ood_rate
        dims = {"station": ev.station, "shift": ev.shift, "lot": ev.lot}
        stamp = msg.timestamp if isinstance(msg.timestamp, int) and msg.timestamp > 0 else None
        for template in self.templates:
            sid = slice_id(template, dims)
            upd = SliceUpdate(
                slice_id=sid, template=template, event_id=ev.event_id, ts=ev.ts,
                source_partition=msg.partition, source_offset=msg.offset, station=ev.station,
                shift=ev.shift, lot=ev.lot, baseline=base.key, cluster=item.cluster,
                distance=item.distance, ood=ood, model_version=ev.model_version,
                prediction=ev.prediction, label=label, loss=loss, error=error, late_label=late,
                reference_id=reference_id or self.reference.reference_id)
            self._sent += 1
            # one slice-update in LATENCY_SAMPLE_EVERY carries its event's Kafka timestamp in a
            # header, for the detect stage's end-to-end latency (a header, not the record's
            # timestamp: retention and broker timestamp checks work on that one)
            headers = ([(SOURCE_TS_HEADER, b"%d" % stamp)]
                       if stamp is not None and self._sent % self.latency_sample_every == 0
                       else None)
            self._send(msg, self.updates_topic, key=sid.encode(),
                       value=upd.model_dump_json().encode(), headers=headers)
        self._tally.add(ev.station, ev.ts.timestamp(), len(self.templates), event=not late)

    # --- event ids: duplicates and late labels -------------------------------------------
    @retry_redis
    def _claim(self, items: list[_Item]) -> list[bool] | None:
        """Store each inference event's prediction for its late label under its ``event_id``
        (``dl:pred:{events topic}:{id}``, kept ``prediction_ttl_s``), with the position it was
        read at, unless the id is stored already; return which events are new. An id first
        stored from another position is a duplicate — a sender's retry landing at a new
        offset — whose updates would count the event twice, so it is skipped. The same
        position read again (a batch replayed after a crash) is not: its updates go out again,
        and the detect stage skips them by source offset. None without Redis: nothing
        checked."""
        if self.redis is None or not items:
            return None
        pipe = self.redis.pipeline(transaction=True)
        at = [_position(item.msg) for item in items]
        for item, pos in zip(items, at, strict=True):
            ev, pred = item.event, item.event.prediction
            # where and when the event was seen: its late label goes to the same slices
            doc = {"cluster": item.cluster, "pred": pred.label if pred else None,
                   "station": ev.station, "shift": ev.shift, "lot": ev.lot,
                   "ts": ev.ts.isoformat(), "pos": pos,
                   "reference_id": self.reference.reference_id}
            key = self._prediction_key(ev.event_id)
            pipe.get(key)
            pipe.set(key, json.dumps(doc), ex=self.prediction_ttl_s, nx=True)
        before = pipe.execute()[0::2]
        # an entry written before positions were kept cannot tell: the event counts
        return [old is None or json.loads(old).get("pos", pos) == pos
                for old, pos in zip(before, at, strict=True)]

    def _release(self, msg: Any) -> None:
        """Forget the event id that ``msg``, about to be dead-lettered, stored (``_claim``):
        sent again once fixed (at a new position), it would be taken for a duplicate. Only if
        the id is still this position's; a Redis error leaves it (logged: that replay would
        be skipped for ``prediction_ttl_s``)."""
        event = self._parse(msg, quiet=True)
        if self.redis is None or isinstance(event, EventRejected) or event.kind != "inference":
            return
        key, pos = self._prediction_key(event.event_id), _position(msg)
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                old: bytes | None = pipe.get(key)  # type: ignore[assignment]
                if old is not None and json.loads(old).get("pos") == pos:
                    pipe.multi()
                    pipe.delete(key)
                    pipe.execute()
        except (*REDIS_ERRORS, redis.WatchError) as exc:
            log.warning("the event id of a dead-lettered event stays stored: sent again, it "
                        "would be skipped as a duplicate",
                        extra={"event_id": event.event_id, "error": repr(exc)})

    def _prediction_key(self, event_id: str) -> str:
        """Per events topic: ids are unique within a plant's stream, not across deployments
        (or test runs) that share a Redis."""
        return f"dl:pred:{self.events_topic}:{event_id}"

    @retry_redis
    def _remember(self, items: list[_Item], vectors: np.ndarray) -> None:
        """The rolling buffer of recent embeddings that the API's similarity search and
        model-version comparison read (``RECENT_KEY``)."""
        if self.redis is None or not items:
            return
        pipe = self.redis.pipeline(transaction=False)
        for item, vec in zip(items, vectors, strict=True):
            ev, pred = item.event, item.event.prediction
            meta = {"event_id": ev.event_id, "ts": ev.ts.timestamp(), "station": ev.station,
                    "shift": ev.shift, "lot": ev.lot, "model_version": ev.model_version,
                    "cluster": item.cluster, "distance": item.distance, "ood": item.ood,
                    "ood_p0": item.ood_p0,
                    "pred": pred.label if pred else None, "score": pred.score if pred else None,
                    "label": ev.label, "reference_id": self.reference.reference_id}
            meta_json = json.dumps(meta)
            pipe.xadd(RECENT_KEY, {"meta": meta_json, "vec": np.asarray(vec, np.float32).tobytes()},
                      maxlen=self.recent_size, approximate=True)
        pipe.execute()

    @retry_redis
    def _emit_late_label(self, item: _Item) -> None:
        ev = item.event
        known: bytes | None = None
        if self.redis is not None:  # then the key written before it was per topic (7 days)
            found: list[bytes | None] = self.redis.mget(  # type: ignore[assignment]
                [self._prediction_key(ev.event_id), f"dl:pred:{ev.event_id}"])
            known = next((v for v in found if v is not None), None)
        if known is None:
            self._dead_letter(item.msg, EventRejected(
                RejectReason.unknown_event,
                f"late label for unknown or expired event {ev.event_id!r}"), ev.event_id)
            return
        doc = json.loads(known)
        item.cluster = doc["cluster"]
        error = None if doc["pred"] is None or ev.label is None else doc["pred"] != ev.label
        if "station" in doc:  # filed under the event's slices and time, not the label's own
            # (a label sent from another shift, or with a placeholder lot); entries written
            # before these fields were kept use the label event's
            item.event = ev.model_copy(update={
                "station": doc["station"], "shift": doc["shift"], "lot": doc["lot"],
                "ts": datetime.fromisoformat(doc["ts"])})
        self._emit(item, ev.label, ev.loss, error, late=True,
                   reference_id=doc.get("reference_id"))

    def _send(self, source: Any, topic: str, **record: Any) -> None:
        """Send, or hold until the batch is done (:meth:`process`)."""
        if self._batch is None:
            self._sent_records.append(self.producer.send(topic, **record))
        else:
            self._batch.held.append(((source.partition, source.offset), topic, record))

    def _dead_letter(self, msg: Any, exc: EventRejected, event_id: str | None = None) -> None:
        # the original's size is the events topic's limit, not the dead-letter topic's: past
        # DLQ_MAX_*_BYTES a prefix is kept, as a record too large to send would stop the worker
        record = DeadLetter.from_rejection(
            exc, topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key,
            value=msg.value, event_id=event_id, max_value_bytes=DLQ_MAX_VALUE_BYTES,
            max_key_bytes=DLQ_MAX_KEY_BYTES)
        key = msg.key[:DLQ_MAX_KEY_BYTES] if msg.key is not None else None
        self._send(msg, self.dlq_topic, key=key, value=record.model_dump_json().encode())
        self._count(self.metrics.dead_letters.labels(exc.reason.value).inc, 1)
        log.info("dead-lettered", extra={"reason": exc.reason.value, "partition": msg.partition,
                                         "offset": msg.offset, "detail": exc.detail[:200]})


def _position(msg: Any) -> str:
    """Where an event was read in the events topic, as the prediction cache records it."""
    return f"{msg.partition}:{msg.offset}"


def _not_ahead(event: Event, msg: Any) -> Event:
    """``event``, unless its time is more than ``MAX_AHEAD_S`` after its record's Kafka
    timestamp (the wall clock if the record has none): a sender's clock or a field gone wrong.
    The detect stage reads event time as its clock — a slice's newest event, a partition's
    cutoff for retiring idle slices — so one event dated a year ahead would make every slice of
    its partition look idle and every later event too old to count."""
    stamp = msg.timestamp / 1000.0 if isinstance(msg.timestamp, int) and msg.timestamp > 0 else (
        time.time())
    ahead = event.ts.timestamp() - stamp
    if ahead > MAX_AHEAD_S:
        raise EventRejected(RejectReason.invalid_field,
                            f"ts {event.ts.isoformat()} is {ahead / 3600:.1f} h after the "
                            f"record's timestamp (at most {MAX_AHEAD_S / 3600:g} h allowed): "
                            "check the sender's clock")
    return event


class _LogAssignments(ConsumerRebalanceListener):  # type: ignore[misc]
    """Log partition moves and mark the stage ready at its first assignment (empty or not)."""

    def __init__(self, stage: EmbedStage) -> None:
        self.stage = stage

    def on_partitions_revoked(self, revoked: list[Any]) -> None:
        log.info("embed partitions revoked", extra={"partitions": [tp.partition for tp in revoked]})
        # No work here: kafka-python calls this on its network thread, where a commit cannot
        # run. The loop finishes its batch in flight before a poll that could rejoin; should a
        # revoke still come with one in flight, that batch's commit fails after the rebalance
        # and its next owner reads it again (the detect stage skips the replayed updates).
        for tp in revoked:  # another worker moves it on: our offset would read as lag later
            self.stage._next.pop(tp, None)
        self.stage.progress.forget(tp.partition for tp in revoked)

    def on_partitions_assigned(self, assigned: list[Any]) -> None:
        log.info("embed partitions assigned",
                 extra={"partitions": [tp.partition for tp in assigned]})
        self.stage.assigned_once.set()


class _Tally:
    """Per-batch sums for the per-event metrics: one metric call per batch and station."""

    def __init__(self) -> None:
        self.updates = 0
        self.stations: dict[str, list[float]] = {}  # station -> [events, last event time]

    def add(self, station: str, ts: float, updates: int, *, event: bool = True) -> None:
        """``updates`` slice-updates sent; ``event``: for a station's inference event (a late
        label is none: it would count as the station's activity, at its event's old time)."""
        self.updates += updates
        if not event:
            return
        seen = self.stations.setdefault(station, [0, ts])
        seen[0] += 1
        seen[1] = max(seen[1], ts)

    def flush(self, metrics: EmbedMetrics) -> None:
        if self.updates:
            metrics.updates_out.inc(self.updates)
        for station, (events, ts) in self.stations.items():
            metrics.events_per_station.labels(station).inc(events)
            metrics.last_event_time.labels(station).set(ts)
        self.updates, self.stations = 0, {}


def _rejoin_pending(consumer: Any) -> bool:
    """kafka-python's coordinator wants to (re)join the group: the next poll revokes."""
    need = getattr(getattr(consumer, "_coordinator", None), "need_rejoin", None)
    try:
        return bool(need()) if callable(need) else False
    except Exception:  # noqa: BLE001 - another client version: the batch may be read again
        return False


def _timed_embed(embedder: EmbedderLike, sources: list[ImageSource], early: Any) -> Embedded:
    started = time.perf_counter()
    emb, errors = (embedder.embed_images(sources) if early is None
                   else embedder.embed_images(sources, early))  # type: ignore[call-arg]
    return emb, errors, time.perf_counter() - started


def _error_of(event: Event) -> bool | None:
    if event.prediction is None or event.label is None:
        return None
    return event.prediction.label != event.label


def _rejection(err: ImageError) -> EventRejected:
    reason = RejectReason(getattr(err, "reason", RejectReason.image_undecodable.value))
    return EventRejected(reason, str(err))
