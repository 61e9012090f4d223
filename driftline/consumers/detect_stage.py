"""Detect stage: slice-updates → per-slice detectors, with an exactly-once effect.

Each input partition's slices live in one worker (Kafka partitions ``driftline.slice-updates`` by
slice id). The checkpoint order, every ``checkpoint_interval_ms`` and on revoke or shutdown:

1. apply polled updates in memory, skipping any whose source offset is not above the slice's
   highest applied offset for its source partition (replays of the embed stage);
2. write, in one Redis transaction fenced by the partition epochs, the dirty slices' state and
   applied source offsets, the next input offset of every owned partition and the alarms raised
   (the outbox the failure book reads);
3. only then commit the same input offsets to Kafka.

The alarm and skip counters count what step 2 stored, after it (``_count_committed``), so a
replay of uncommitted work does not count them twice.

On assignment a worker claims the partition's epoch, loads its slices and seeks to the input
offset stored in Redis, so Redis — not Kafka's committed offset — is the truth: a crash between
steps 2 and 3 does not re-apply anything, and a crash before step 2 loses only in-memory work that
is read again.

Redis outages: the loop never waits on Redis for long, so the worker keeps polling (its group
membership and any rebalance go on) and resumes by itself when Redis is back.

- A checkpoint that cannot reach Redis within the store's wait (a few seconds) is retried at a
  later turn — during an outage one attempt per try, with a backoff of up to
  ``REDIS_BACKOFF_MAX_S`` between tries; updates go on being applied in memory meanwhile
  (``checkpoint_age_seconds`` grows and pages), and the first checkpoint after the outage
  writes them all. A connection lost mid-transaction is an outage, not a fence.
- A transaction may land with its reply lost (a timeout right after ``EXEC``). The next
  checkpoint first reads whether the input offsets it wrote are stored: if so, the alarms it
  carried are in the outbox already and only the ones raised since are written (``XADD`` is the
  one write that is not idempotent; states and offsets are simply written again).
- kafka-python runs rebalance listeners on its I/O loop, where heartbeats wait, so
  ``on_partitions_assigned`` only pauses the new partitions; the loop claims and loads them
  (unless the group has moved on to another generation meanwhile) and then resumes them.
  ``on_partitions_revoked`` starts no Redis retry after ``revoke_wait_s`` (one attempt is bounded
  by the client's socket timeout); if Redis stays unreachable it drops the uncommitted work:
  the next owner reads it again from the last checkpoint, and the partitions this worker keeps
  are reloaded likewise.
- A fence (another worker claimed some partitions) drops those partitions, pauses them and asks
  the group to rebalance (a fence is none), and reloads the others likewise. A partition never
  checkpointed is read from the beginning of the topic when loaded: Redis, not a position kept
  by the consumer across a rebalance, says where to read.
- A stop (SIGTERM) with Redis unreachable leaves the uncommitted work to be read again.

Slice retirement (``retire_after_s`` > 0, ``DRIFTLINE_SLICE_RETIRE_AFTER_DAYS``): a new slice id
makes a new slice — one per production lot with the ``lot`` template — so idle slices are
retired, or a worker would hold every lot it ever saw. Idleness is measured in event time, never
wall time: a slice is *retirable* when its newest event (``last_time``; a slice that has only
late labels has none) is more than the horizon older than the newest event its partition has
applied (the *cutoff*), and it has no open alarm (a drifted lot stays until its alarm clears or
on-call resolves it). The rule is a function of the partition's log (and of the reset requests
applied), not of when checkpoints run, so a replay makes the same decisions:

- an update for a retirable slice retires it and starts the slice afresh, whether or not the
  sweep below has removed it yet (a returning lot is judged on its new events, not on a state
  frozen weeks ago);
- an update that would start a slice (none held, or a retirable one) is skipped, counted as
  ``skipped{reason="retired"}``, when it is a late label or an event older than the cutoff: its
  slice was retired, or it would be at once;
- the sweep — at checkpoints, every ``retire_sweep_s`` of wall time per partition, so that the
  checkpoint's hot path does not scan every slice each second — removes retirable slices from
  memory, and step 2 deletes their state and summary fields (``HDEL``) in the same fenced
  transaction as the partition's input offsets. Their gauges go once that has landed.

Why this keeps the effect exactly-once: every update a retired slice applied came from below the
input offsets committed with its deletion, so no replay from Redis's offsets reads them again;
a crash before that transaction lands leaves the slice, and the offsets it was built up to, in
Redis, and the replay applies the same updates to it and reaches the same decisions. The
residual case is a duplicate the embed stage emits after a crash of its own (the same source
offset, at a higher input offset) for a slice retired since: the applied source offsets that
would catch it went with the slice, but the duplicate carries its event's time, no later than
the retired slice's newest event, so it is older than the cutoff (which only grows) and the
second rule skips it instead of starting the slice again with it. A duplicate that arrives
after the slice started afresh on a new event from another source partition is applied to the
new slice: counted once in the statistics that exist, never twice in one slice's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError
from pydantic_core import from_json

from driftline.alerts.model import iso
from driftline.alerts.store import stream_id
from driftline.consumers.checkpoint import (
    REDIS_ERRORS,
    CheckpointStore,
    Fenced,
    RedisOutage,
    encode_record,
    encode_summary,
)
from driftline.consumers.heap import release_free_heap
from driftline.consumers.kafka_io import (
    JoinWatch,
    ProgressLog,
    request_rejoin,
    subscribe_when_ready,
)
from driftline.consumers.slice_state import UpdateView, is_late_label
from driftline.metrics import ConsumerMetrics, DetectMetrics
from driftline.schema import MAX_SLICE_CHARS, SOURCE_TS_HEADER, SliceUpdate, parse_slice_id

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 200
REDIS_BACKOFF_MAX_S = 5.0
MAX_POLL_RECORDS = 2000
# Slices with per-slice gauges: their labels (station, shift) are bounded; lots are not.
GAUGED_TEMPLATES = ("station", "station+shift")
STATION_SHIFT_LABEL = "all"  # the shift label of a station slice's gauges (every shift)
# How often a partition's slices are scanned for retirement (wall time): the horizon is days of
# event time, so minutes of delay cost nothing; a scan of 10,000 slices takes ~0.6 ms
# (benchmarks/slice_retirement.py), which every checkpoint (each second) need not pay.
RETIRE_SWEEP_S = 300.0


class SliceModel(Protocol):
    """What the stage needs of a slice's detectors (see :mod:`driftline.consumers.slice_state`)."""

    template: str

    @property
    def dims(self) -> dict[str, str]: ...

    @property
    def n(self) -> int: ...

    @property
    def last_time(self) -> float | None: ...  # event time of its newest event

    @property
    def open(self) -> Mapping[str, Any]: ...  # open alarms by detector

    def update(self, upd: UpdateView) -> list[dict[str, Any]]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def gauges(self) -> dict[str, Any]: ...

    def reset(self, detectors: Iterable[str] | None = None) -> None: ...


@dataclass(slots=True)
class SliceEntry:
    model: SliceModel
    applied: dict[int, int] = field(default_factory=dict)  # source partition -> offset
    # the (station, shift) its gauges are published under (gauged templates; None: none):
    # what to remove when its partition moves away or it is retired
    gauged: tuple[str, str] | None = None


@dataclass
class PartitionState:
    epoch: int
    next_offset: int | None
    slices: dict[str, SliceEntry]
    control_seen: str = "0-0"
    dirty: set[str] = field(default_factory=set)
    # the newest event time applied, and the retirement cutoff it sets (-inf: none, or off)
    newest: float = -math.inf
    cutoff: float = -math.inf
    # retired since the last checkpoint: deleted from Redis by the next one, unless a slice of
    # the same id has started afresh meanwhile (its record then overwrites the old one)
    retired: dict[str, SliceEntry] = field(default_factory=dict)
    swept_at: float = -math.inf  # monotonic time of the last retirement sweep


class DetectStage(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the detect loop for one worker of the ``driftline-detect`` group."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        topic: str,
        store: CheckpointStore,
        new_slice: Callable[[UpdateView], SliceModel],
        restore_slice: Callable[[dict[str, Any]], SliceModel],
        metrics: DetectMetrics,
        consumer_metrics: ConsumerMetrics,
        checkpoint_interval_s: float = 1.0,
        revoke_wait_s: float = 5.0,
        reference_id: str | None = None,
        retire_after_s: float = 0.0,
        retire_sweep_s: float = RETIRE_SWEEP_S,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.store = store
        self.new_slice = new_slice
        self.restore_slice = restore_slice
        self.metrics = metrics
        self.cmetrics = consumer_metrics
        self.interval = checkpoint_interval_s
        self.revoke_wait_s = revoke_wait_s
        # checked on every slice-update, and written on every outbox message (the book
        # describes the clusters of alarms raised on the reference it knows)
        self.reference_id = reference_id
        # event-time horizon after which an idle slice is retired (0: never; module docstring)
        self.retire_after_s = retire_after_s
        self.retire_sweep_s = retire_sweep_s
        self._other_reference: dict[str, int] = {}  # skipped since the last log line
        self._other_labels: dict[str, int] = {}  # late labels of another reference, likewise
        self._other_logged = -math.inf
        self.parts: dict[int, PartitionState] = {}
        self.pending: set[int] = set()  # assigned and paused, not yet claimed and loaded
        self.outbox: list[dict[str, Any]] = []
        # A checkpoint that failed after its transaction may have been sent: the input offsets
        # it wrote and how many outbox alarms it carried; the first ``_outbox_stored`` alarms
        # of the outbox are known to be in Redis (module docstring).
        self._unsure: tuple[dict[int, int], int] | None = None
        self._outbox_stored = 0
        # skips by reason since the last checkpoint: counted when it lands, dropped with the
        # outbox (see _count_committed)
        self.skips: dict[str, int] = {}
        self.stop_event = threading.Event()
        self.beat = time.monotonic()  # last turn of run()'s loop (see Service.liveness)
        self.assigned_once = threading.Event()
        self.last_checkpoint = time.monotonic()
        self._closed = False
        self.progress = ProgressLog("detect", metrics=consumer_metrics)
        self.join_watch = JoinWatch("detect", metrics=consumer_metrics)
        self.outage = RedisOutage("detect")
        self._redis_backoff, self._redis_retry_at = 0.0, 0.0  # between turns, during an outage
        self._generation: int | None = None  # the group generation of the last assignment
        self._skipped_generation: int | None = None
        self.fenced: set[int] = set()  # claimed by another worker; paused until reassigned

    # --- rebalance -----------------------------------------------------------------------
    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # On close kafka-python revokes everything after run() has already checkpointed.
        try:
            if revoked and not self._closed:
                with self.store.waiting_at_most(
                        0.0 if self.outage.active else self.revoke_wait_s):
                    if not self._checkpoint_safely(in_listener=True):
                        self._drop_uncommitted({tp.partition for tp in revoked})
        finally:
            self._forget_gauges(tp.partition for tp in revoked)
            for tp in revoked:
                self.parts.pop(tp.partition, None)
                self.pending.discard(tp.partition)
                self.fenced.discard(tp.partition)
            self.progress.forget(tp.partition for tp in revoked)
            self._refresh_gauges()
            if revoked:
                release_free_heap()  # the revoked slices' heap

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Pause the new partitions; :meth:`_restore_pending` claims and loads them from the
        poll loop (see the module docstring)."""
        tps = list(assigned)
        self._generation = _generation(self.consumer)
        self.fenced.difference_update(tp.partition for tp in tps)
        if tps:
            self.consumer.pause(*tps)
            self.pending.update(tp.partition for tp in tps)
            log.info("partitions assigned",
                     extra={"partitions": sorted(tp.partition for tp in tps),
                            "generation": self._generation})
        else:
            self.assigned_once.set()  # a member with nothing to own is ready too
        self._refresh_gauges()

    def _restore_pending(self) -> None:
        """Claim the pending partitions' epochs, load their slices, seek to the stored input
        offsets and resume them; with Redis unreachable the rest stay paused and pending for a
        later turn of the loop. Nothing is claimed once the group moved on from the generation
        that assigned them (a member evicted during an outage must not fence the new owner):
        the coming rebalance revokes or assigns them again."""
        generation = _generation(self.consumer)
        if generation != self._generation:
            if generation != self._skipped_generation:  # once per generation seen
                log.info("not claiming: the group moved on since the assignment",
                         extra={"assigned_in": self._generation, "now": generation})
                self._skipped_generation = generation
            return
        try:
            with self._redis_attempt():
                parts = sorted(self.pending)
                restored = bool(parts)
                epochs = self.store.claim(parts)
                for p in parts:
                    offset, records, seen = self.store.load(p)
                    before = self._retuned()
                    slices = {sid: SliceEntry(self.restore_slice(rec["state"]),
                                              {int(src): o for src, o in rec["applied"].items()})
                              for sid, rec in _drained(records)
                              if self._well_formed(sid, rec["state"].get("template"), p)}
                    after = self._retuned()
                    retuned = None if before is None or after is None else after - before
                    part = self.parts[p] = PartitionState(epochs[p], offset, slices, seen)
                    # gauged slices (stations, station×shift: few) export their state now: a
                    # station with an open alarm that sends nothing more would otherwise show
                    # none on the dashboards until its next event
                    for entry in slices.values():
                        if entry.model.template in GAUGED_TEMPLATES:
                            self._publish_gauges(entry, entry.model.gauges())
                    # the newest event applied: a retired slice's are older than the cutoff
                    self._saw(part, max((t for e in slices.values()
                                         if (t := e.model.last_time) is not None),
                                        default=-math.inf))
                    tp = TopicPartition(self.topic, p)
                    if offset is not None:
                        self.consumer.seek(tp, offset)
                    else:  # never checkpointed: Redis, not a kept position, says where to read
                        self.consumer.seek_to_beginning(tp)
                    self.consumer.resume(tp)
                    self.pending.discard(p)
                    log.info("partition restored", extra={
                        "partition": p, "offset": offset, "slices": len(slices),
                        **({} if retuned is None else {"thresholds_updated": retuned})})
        except REDIS_ERRORS as exc:
            self._redis_failed("partitions not restored yet (paused until they are)", exc,
                               pending_partitions=sorted(self.pending))
            return
        self._redis_ok()
        self.assigned_once.set()
        self._refresh_gauges()
        if restored:
            release_free_heap()  # what the decoded records left (driftline.consumers.heap)

    def _retuned(self) -> int | None:
        """How many restored slices ``restore_slice`` has moved onto the current thresholds so
        far, if it counts them (:class:`~driftline.consumers.slice_state.SliceRestorer`)."""
        n = getattr(self.restore_slice, "retuned", None)
        return n if isinstance(n, int) else None

    def _park(self, partitions: list[int]) -> None:
        """Forget ``partitions``' in-memory state and load them again, as on assignment (the
        load seeks to where their last checkpoint left off), paused until then. Their gauges
        go too: the reloaded slices start untracked and publish again when next updated, so a
        kept series would be left frozen — and exported beside its next owner's."""
        self._forget_gauges(partitions)
        for p in partitions:
            del self.parts[p]
        if partitions:
            self.consumer.pause(*(TopicPartition(self.topic, p) for p in partitions))
            self.pending.update(partitions)

    def _drop_uncommitted(self, revoked: set[int]) -> None:
        """Redis stayed unreachable for a revoke's checkpoint: forget every partition's
        in-memory work since the last checkpoint (the outbox belongs to all of them) and reload
        the partitions this worker keeps, as on assignment."""
        kept = sorted(set(self.parts) - revoked)
        log.warning("checkpoint at revoke failed: uncommitted work dropped, it is read again "
                    "from the last checkpoint", extra={"kept_partitions": kept})
        self.metrics.checkpoints.labels("dropped").inc()
        self._drop_outbox()
        self._forget_gauges(revoked)
        self._park(kept)
        self.parts.clear()

    # --- Redis outages -------------------------------------------------------------------
    def _redis_attempt(self) -> Any:
        """During an outage one attempt per call: the loop retries at a later turn."""
        return self.store.waiting_at_most(0.0 if self.outage.active else self.store.wait_s)

    def _redis_due(self) -> bool:
        return time.monotonic() >= self._redis_retry_at

    def _redis_failed(self, what: str, exc: BaseException, **extra: Any) -> None:
        self.outage.down(f"{what}; retrying", exc, **extra)
        self._redis_backoff = min(REDIS_BACKOFF_MAX_S, max(0.5, 2 * self._redis_backoff))
        self._redis_retry_at = time.monotonic() + self._redis_backoff

    def _redis_ok(self) -> None:
        self.outage.up()
        self._redis_backoff, self._redis_retry_at = 0.0, 0.0

    # --- main loop -----------------------------------------------------------------------
    def run(self) -> None:
        """Poll, apply and checkpoint until :meth:`stop`; then checkpoint and close. An error
        while applying updates ends the loop without that last checkpoint: a slice may be half
        updated by the failing one, which is not in its applied offsets, so the next owner
        would apply it again on top. The work since the last checkpoint is read again."""
        subscribe_when_ready(self.consumer, self.topic, self)
        torn = False
        try:
            while not self.stop_event.is_set():
                self.beat = time.monotonic()  # liveness: the loop turns
                batch = self.consumer.poll(timeout_ms=POLL_TIMEOUT_MS,
                                           max_records=MAX_POLL_RECORDS)
                self.join_watch.check(self.consumer)
                # assigned in that poll (paused: the batch has none of theirs), or left over
                if self.pending and self._redis_due():
                    self._restore_pending()
                torn = True
                for tp, messages in batch.items():
                    self.apply_batch(tp.partition, messages)
                torn = False
                if (time.monotonic() - self.last_checkpoint >= self.interval
                        and self._redis_due()):
                    with self._redis_attempt():
                        self._checkpoint_safely()
                    self._report_lag()
                self.metrics.checkpoint_age.set(time.monotonic() - self.last_checkpoint)
        finally:
            if torn:
                log.error("stopping on an error while applying updates, without a last "
                          "checkpoint: the uncommitted work is read again from the last one")
            else:
                with self._redis_attempt():
                    if not self._checkpoint_safely():
                        log.warning("stopping without a last checkpoint: the uncommitted work "
                                    "is read again from the last one")
            self._closed = True
            self.consumer.close(autocommit=False)

    def stop(self) -> None:
        self.stop_event.set()

    def apply_batch(self, partition: int, messages: list[Any]) -> None:
        """Step 1 for one partition's polled messages, in offset order; counters once per call,
        end-to-end latency for applied updates that carry their event's timestamp (one in
        ``LATENCY_SAMPLE_EVERY``, chosen by the embed stage)."""
        part = self.parts.get(partition)
        if part is None or not messages:  # revoked while the batch was in flight
            return
        applied = duplicates = 0
        sampled: list[Any] = []
        for msg in messages:
            done = self._apply(part, msg)
            if done:
                applied += 1
                if msg.headers:
                    sampled.append(msg.headers)
            elif done is not None:
                duplicates += 1
        part.next_offset = messages[-1].offset + 1
        self.progress.count(len(messages))
        if applied:
            self.metrics.updates.inc(applied)
        if duplicates:
            self.metrics.duplicates.inc(duplicates)
        if (self._other_reference or self._other_labels) \
                and time.monotonic() - self._other_logged >= 60.0:
            self._other_logged = time.monotonic()
            if self._other_reference:
                log.warning("slice-updates of another reference skipped: restart every embed "
                            "and detect worker after activating a reference", extra={
                                "reference": self.reference_id,
                                "skipped": self._other_reference})
            if self._other_labels:
                log.info("late labels of events embedded on another reference skipped: their "
                         "clusters are that reference's (expected for a while after an "
                         "activation; no restart needed)", extra={
                             "reference": self.reference_id, "skipped": self._other_labels})
            self._other_reference, self._other_labels = {}, {}
        now = time.time()
        for headers in sampled:
            for key, value in headers:
                if key == SOURCE_TS_HEADER:
                    try:
                        self.metrics.e2e_latency.observe(max(0.0, now - int(value) / 1000))
                    except (TypeError, ValueError):  # not ours: no reading
                        pass

    def _apply(self, part: PartitionState, msg: Any) -> bool | None:
        """Apply one slice-update: True if applied, False for a replayed duplicate, None if
        unreadable (logged and skipped: the stream goes on)."""
        try:
            upd = parse_update(msg.value)
        except ValidationError as exc:
            self._skip("unreadable")
            log.error("unreadable slice-update skipped",
                      extra={"partition": msg.partition, "offset": msg.offset,
                             "error": str(exc)})
            return None
        ref = upd.reference_id
        if ref is not None and self.reference_id is not None and ref != self.reference_id:
            # embedded against another reference (a rolling restart after an activation):
            # its cluster and OOD flag mean nothing against this one's baselines. A late label
            # carries its event's reference: labels of events embedded before an activation
            # keep coming after every worker moved, and are no sign of a split fleet.
            if is_late_label(upd):
                self._skip("other_reference_label")
                self._other_labels[ref] = self._other_labels.get(ref, 0) + 1
            else:
                self._skip("other_reference")
                self._other_reference[ref] = self._other_reference.get(ref, 0) + 1
            return None
        entry = part.slices.get(upd.slice_id)
        # a slice not held, or (rarely) one idle past the horizon: the module docstring's rules
        if entry is None or (((last := entry.model.last_time) is None or last < part.cutoff)
                             and self.retire_after_s > 0 and not entry.model.open):
            entry = self._start_slice(part, upd, msg, entry)
            if entry is None:
                return None
        src = upd.source_partition
        if upd.source_offset <= entry.applied.get(src, -1):
            return False
        try:
            messages = entry.model.update(upd)
        except (KeyError, ValueError) as exc:  # raised before the slice changed anything
            if not entry.applied:
                del part.slices[upd.slice_id]
                gone = part.retired.get(upd.slice_id)
                if gone is not None:  # the gauges it took over go with the retired slice
                    gone.gauged, entry.gauged = entry.gauged, None
            self._skip("unusable")
            log.error("unusable slice-update skipped",
                      extra={"partition": msg.partition, "offset": msg.offset,
                             "slice": upd.slice_id, "error": repr(exc)})
            return None
        entry.applied[src] = upd.source_offset
        part.dirty.add(upd.slice_id)
        if (last := entry.model.last_time) is not None and last > part.newest:
            self._saw(part, last)
        for out in messages:
            if out["kind"] == "alarm":
                log.info("alarm", extra=_alarm_fields(upd.slice_id, out))
            self.outbox.append({**out, "slice_id": upd.slice_id, "template": upd.template,
                                "reference_id": self.reference_id})
        return True

    def _skip(self, reason: str) -> None:
        self.skips[reason] = self.skips.get(reason, 0) + 1

    def _start_slice(self, part: PartitionState, upd: UpdateView, msg: Any,
                     idle: SliceEntry | None) -> SliceEntry | None:
        """A new slice for ``upd``, whose slice is not held or is ``idle`` (retirable: it is
        retired, and deleted from Redis at the next checkpoint unless this one is written over
        it); None if the update is skipped — unreadable, or one that must not start a slice
        (a late label, an event older than the cutoff)."""
        sid = upd.slice_id
        if self.retire_after_s > 0 and (is_late_label(upd) or upd.ts.timestamp() < part.cutoff):
            self._skip("retired")
            return None
        if not self._well_formed(sid, upd.template, msg.partition, msg.offset):
            self._skip("unreadable")
            return None
        if idle is not None:
            del part.slices[sid]
            part.dirty.discard(sid)
            part.retired[sid] = idle
        entry = part.slices[sid] = SliceEntry(self.new_slice(upd))
        gone = part.retired.get(sid) if part.retired else None
        if gone is not None:  # the same gauge labels: the new slice's publishing takes them on
            entry.gauged, gone.gauged = gone.gauged, None
        return entry

    def _saw(self, part: PartitionState, newest: float) -> None:
        """The partition applied an event at ``newest``, later than any before."""
        part.newest = newest
        if self.retire_after_s > 0:
            part.cutoff = newest - self.retire_after_s

    @staticmethod
    def _well_formed(sid: str, template: Any, partition: int, offset: int | None = None
                     ) -> bool:
        """Whether a slice id names exactly its template's dimensions (``station=s1|shift=A``
        for ``station+shift``). The embed stage writes nothing else; a foreign or damaged
        record must not become a slice that fails every checkpoint and rebalance (its
        summary and gauges read the dimensions from the id)."""
        try:
            dims = parse_slice_id(sid)
            ok = isinstance(template, str) and list(dims) == template.split("+") and all(
                dims.values())
        except ValueError:
            ok = False
        if not ok:
            log.error("slice-update skipped: its slice id does not match its template",
                      extra={"partition": partition, "offset": offset, "slice": sid,
                             "template": template})
        return ok

    def _publish_gauges(self, entry: SliceEntry, g: dict[str, Any]) -> None:
        """Gauges for station and station+shift slices (bounded labels), at checkpoint time
        (``g``: the slice's :meth:`~SliceModel.gauges`); series the slice no longer has (an
        emptied window) go, not left frozen."""
        model = entry.model
        if model.template not in GAUGED_TEMPLATES:
            return
        if model.dims.get("shift") == STATION_SHIFT_LABEL:
            # a shift named like the station slices' shift label would share their series
            # (and replace or remove them with its own): such a cell alarms but exports none
            return
        key = (model.dims["station"], model.dims.get("shift", STATION_SHIFT_LABEL))
        # the ratio restarts at the crossing that opens an alarm, so it never reads 1 here:
        # whether an alarm is open is its own series
        self.metrics.slices.set(*key, g.get("ratios", {}), model.open, g.get("ood_ratio"),
                                g.get("cluster_shares") if model.template == "station" else None)
        if entry.gauged is not None and entry.gauged != key:
            self.metrics.slices.remove(*entry.gauged)
        entry.gauged = key

    def _unpublish_gauges(self, entry: SliceEntry) -> None:
        if entry.gauged is not None:
            self.metrics.slices.remove(*entry.gauged)
            entry.gauged = None

    def _forget_gauges(self, partitions: Iterable[int]) -> None:
        """Drop the gauges of slices this worker no longer owns: their new owner exports
        them, and a frozen copy here would outlive the drift (``max by`` in the rules and
        dashboards would show a resolved slice in alarm)."""
        for p in partitions:
            part = self.parts.get(p)
            entries = [*part.slices.values(), *part.retired.values()] if part is not None else []
            for entry in entries:
                self._unpublish_gauges(entry)

    # --- checkpoint ----------------------------------------------------------------------
    def _apply_control(self) -> None:
        """Reset the slices whose incident on-call resolved (the failure book's requests)."""
        if not self.parts:
            return
        after = min((p.control_seen for p in self.parts.values()), key=stream_id)
        for req in self.store.control_after(after):
            for part in self.parts.values():
                if stream_id(req.entry_id) <= stream_id(part.control_seen):
                    continue
                part.control_seen = req.entry_id
                entry = part.slices.get(req.slice_id)
                if entry is not None:
                    entry.model.reset(req.detectors)
                    part.dirty.add(req.slice_id)
                    log.info("slice reset on request", extra={
                        "slice": req.slice_id, "detectors": req.detectors or "all",
                        "incident": req.incident, "resolved_by": req.who,
                        "request": req.entry_id})

    def _sweep(self) -> None:
        """Retire every retirable slice of the partitions not swept for ``retire_sweep_s`` (a
        partition just loaded is swept at its first checkpoint): out of memory now, out of
        Redis with the checkpoint's transaction."""
        if self.retire_after_s <= 0:
            return
        now = time.monotonic()
        for part in self.parts.values():
            if now - part.swept_at < self.retire_sweep_s:
                continue
            part.swept_at = now
            cutoff = part.cutoff
            idle = [sid for sid, e in part.slices.items()
                    if ((t := e.model.last_time) is None or t < cutoff) and not e.model.open]
            for sid in idle:
                part.retired[sid] = part.slices.pop(sid)
                part.dirty.discard(sid)

    def _retirements_committed(self) -> None:
        """After the transaction that deleted them: the retired slices' gauges go, and one line
        and the counter say how many were retired (not one line per slice)."""
        by_partition, afresh = {}, 0
        for p, part in self.parts.items():
            if not part.retired:
                continue
            for sid, entry in part.retired.items():
                afresh += sid in part.slices
                self._unpublish_gauges(entry)
            by_partition[p] = len(part.retired)
            part.retired = {}
        if by_partition:
            retired = sum(by_partition.values())
            self.metrics.retired.inc(retired)
            log.info("idle slices retired", extra={
                "retired": retired, "started_afresh": afresh, "by_partition": by_partition,
                "horizon_days": round(self.retire_after_s / 86400, 3),
                "live_slices": sum(len(p.slices) for p in self.parts.values())})

    def checkpoint(self, in_listener: bool = False) -> bool:
        """Steps 2 and 3 of the module docstring (after applying reset requests and the
        retirement sweep). Returns whether Redis was reached (not when this worker holds no
        loaded partition).
        ``in_listener``: called from a rebalance listener, on kafka-python's I/O thread, where
        only an asynchronous Kafka commit is possible, and reset requests and the sweep wait for
        the next checkpoint (or the partition's next owner) so that one Redis call is made."""
        if not in_listener:
            self._apply_control()
            self._sweep()
        # Each dirty slice's record and summary are encoded as they are made: the snapshot's
        # dicts and arrays are freed before the next slice's are built, instead of thousands
        # held until the transaction — long enough for the garbage collector to promote them
        # and then walk every object of the worker (a third or more of the checkpoint's CPU in
        # benchmarks/results/detect_cpu.md).
        states: dict[int, dict[str, dict[str, Any] | bytes]] = {}
        gauges: dict[str, dict[str, Any]] = {}
        summaries: dict[str, dict[str, Any] | bytes] = {}
        for p, part in self.parts.items():
            records = states[p] = {}
            for sid in part.dirty:
                entry = part.slices[sid]
                records[sid] = encode_record({"state": entry.model.snapshot(),
                                              "applied": entry.applied})
                g = entry.model.gauges()
                summaries[sid] = encode_summary(_summary(entry.model, g))
                if entry.model.template in GAUGED_TEMPLATES:  # the others publish none
                    gauges[sid] = g
        offsets = {p: part.next_offset for p, part in self.parts.items()
                   if part.next_offset is not None}
        epochs = {p: part.epoch for p, part in self.parts.items()}
        # a slice started afresh since its retirement is written over its old record instead
        retired = {p: gone for p, part in self.parts.items()
                   if part.retired and (gone := [sid for sid in part.retired
                                                 if sid not in part.slices])}
        if not offsets and not self.outbox:
            if not self.pending:  # partitions waiting to be loaded keep the age growing
                self.last_checkpoint = time.monotonic()
            return bool(self.parts)
        stored = self._stored_alarms()
        unsent = len(self.outbox) > stored
        self._unsure = (offsets, len(self.outbox)) if offsets and unsent else None
        self.store.commit(epochs, states, offsets, self.outbox[stored:], summaries,
                          {p: part.control_seen for p, part in self.parts.items()}, retired)
        self._unsure = None
        for part in self.parts.values():
            for sid in part.dirty:
                if sid in gauges:
                    self._publish_gauges(part.slices[sid], gauges[sid])
            part.dirty.clear()
        self._retirements_committed()
        self._count_committed()
        self.last_checkpoint = time.monotonic()
        self.metrics.checkpoints.labels("ok").inc()
        self._refresh_gauges()  # live slices grow between rebalances
        commit = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                  for p, o in offsets.items()}
        try:
            if in_listener:
                self.consumer.commit_async(commit)
            else:
                self.consumer.commit(commit)
        except Exception as exc:  # Kafka's offsets are advisory; Redis holds the truth
            log.warning("kafka offset commit failed", extra={"error": str(exc)})
        return True

    def _stored_alarms(self) -> int:
        """How many alarms at the head of the outbox are in Redis already: those of a checkpoint
        whose transaction landed though its reply was lost (its input offsets read as stored;
        offsets only move forward while the epochs hold)."""
        if self._unsure is not None:
            offsets, sent = self._unsure
            if self.store.landed(offsets):
                log.info("the last checkpoint had landed before its reply was lost: its alarms "
                         "are not written again", extra={"alarms": sent - self._outbox_stored})
                self._outbox_stored = sent
            self._unsure = None
        return self._outbox_stored

    def _drop_outbox(self) -> None:
        """The outbox and skips start afresh: committed, or dropped with the work since the last
        checkpoint (which a reload reads again)."""
        self.outbox, self.skips = [], {}
        self._unsure, self._outbox_stored = None, 0

    def _count_committed(self) -> None:
        """After the transaction that stored them: alarms and skips enter their counters, and
        the outbox starts afresh.

        Uncommitted work dropped (a fence, a revoke with Redis down) is read again from the last
        checkpoint, and a crashed worker's is read again by the next: counted when raised, an
        alarm or a skipped record would count once per reading, though the book receives the
        alarm once and a record is skipped once in the log's effect. Counted here, each counts
        once (a crash between the transaction and this line leaves a batch uncounted, never
        counted twice), like the retirements. ``slice_updates_total`` and
        ``duplicates_total`` count applications, again on a replay: they measure the work done,
        and ``DriftlineDetectStalled`` reads them as progress while Redis is down and nothing
        commits."""
        alarms = self.metrics.alarms
        for out in self.outbox:
            if out["kind"] == "alarm":
                alarms.labels(out["template"], out["detector"]).inc()
        for reason, n in self.skips.items():
            self.metrics.skipped.labels(reason).inc(n)
        self._drop_outbox()

    def _checkpoint_safely(self, in_listener: bool = False) -> bool:
        """Checkpoint; False if Redis stayed unreachable (the work stays in memory for a later
        try)."""
        try:
            reached = self.checkpoint(in_listener)
        except Fenced as exc:
            self._on_fenced(exc)
            reached = True
        except REDIS_ERRORS as exc:
            self.metrics.checkpoints.labels("failed").inc()
            self._redis_failed("checkpoint not written (updates applied in memory meanwhile)",
                               exc, uncommitted_slices=sum(
                len(p.dirty) for p in self.parts.values()))
            return False
        if reached:
            self._redis_ok()
        return True

    def _on_fenced(self, exc: Fenced) -> None:
        """Another worker claimed some partitions: their state here is stale, so they are
        dropped, paused and a rebalance asked for. The in-memory work of the others is dropped
        too (the outbox serves them all) and they are loaded again."""
        stale = sorted(exc.stale & set(self.parts))
        kept = sorted(set(self.parts) - exc.stale)
        self.metrics.checkpoints.labels("fenced").inc()
        log.warning("checkpoint fenced: partitions claimed by another worker are dropped; the "
                    "others are loaded again from their last checkpoint",
                    extra={"stale": stale, "kept": kept, "error": str(exc)})
        self._drop_outbox()
        self._forget_gauges(stale)
        for p in stale:
            del self.parts[p]
        if stale:
            self.consumer.pause(*(TopicPartition(self.topic, p) for p in stale))
            self.fenced.update(stale)
            # a fence is no rebalance: ask for one, or they could stay paused for good (an
            # epoch lost with Redis's data, a claimant that died before rejoining)
            request_rejoin(self.consumer)
        self.progress.forget(stale)
        self._park(kept)
        self._refresh_gauges()

    def _report_lag(self) -> None:
        """Lag per owned partition (the high watermark the last fetch response carried minus the
        next offset to apply; no broker request) and the progress log. A partition with nothing
        applied and no stored offset has no reading: offset 0 would count a retention-trimmed
        log's whole history, and ``position()`` may call the broker."""
        # loading, or fenced and waiting to be reassigned: owned, no reading
        positions: dict[int, int | None] = dict.fromkeys(self.pending | self.fenced)
        positions.update({p: part.next_offset for p, part in self.parts.items()})
        self.progress.report(self.consumer, self.topic, positions)

    def _refresh_gauges(self) -> None:
        self.cmetrics.assigned.labels("detect").set(
            len(self.parts) + len(self.pending) + len(self.fenced))
        self.metrics.live_slices.set(sum(len(p.slices) for p in self.parts.values()))

    @property
    def ready(self) -> bool:
        return self.assigned_once.is_set()

    def slice_counts(self) -> dict[str, int]:
        return {sid: e.model.n for part in self.parts.values() for sid, e in part.slices.items()}


class FastPrediction(NamedTuple):
    """A slice-update's prediction read without pydantic (label and score, as validated)."""

    label: str
    score: float


class FastUpdate:
    """A slice-update read without pydantic: the fields of :class:`SliceUpdate`, same types
    (``prediction`` a :class:`FastPrediction`)."""

    __slots__ = ("slice_id", "template", "event_id", "ts", "source_partition", "source_offset",
                 "station", "shift", "lot", "baseline", "cluster", "distance", "ood",
                 "model_version", "prediction", "label", "loss", "error", "late_label",
                 "reference_id")

    slice_id: str
    template: str
    event_id: str
    ts: datetime
    source_partition: int
    source_offset: int
    station: str
    shift: str
    lot: str
    baseline: str
    cluster: int | None
    distance: float | None
    ood: bool | None
    model_version: str | None
    prediction: FastPrediction | None
    label: str | None
    loss: float | None
    error: bool | None
    late_label: bool
    reference_id: str | None


def parse_update(raw: bytes) -> UpdateView:
    """Read a slice-update. The internal topic is written by our embed stage, so the usual
    record takes a fast path: JSON parse and exact type checks, half the cost of pydantic's
    validation. Anything else (coercible values, predictions, or garbage) goes through
    :class:`SliceUpdate` validation, which raises :class:`~pydantic.ValidationError` for what
    is truly malformed. A prediction takes the fast path too (most events carry one): exactly
    a label of 1 to ``MAX_SLICE_CHARS`` characters and a score in [0, 1]."""
    try:
        d = from_json(raw, cache_strings="keys")
        u = FastUpdate()
        u.slice_id, u.template, u.event_id = d["slice_id"], d["template"], d["event_id"]
        u.station, u.shift, u.lot, u.baseline = d["station"], d["shift"], d["lot"], d["baseline"]
        ts, u.source_partition, u.source_offset = d["ts"], d["source_partition"], d[
            "source_offset"]
        if not (type(u.slice_id) is type(u.template) is type(u.event_id) is type(u.station)
                is type(u.shift) is type(u.lot) is type(u.baseline) is type(ts) is str
                and type(u.source_partition) is type(u.source_offset) is int
                and len(ts) >= 19):
            raise TypeError("needs validation")
        u.ts = datetime.fromisoformat(ts)
        pr = d.get("prediction")
        if pr is None:
            u.prediction = None
        else:
            label, score = pr["label"], pr["score"]
            if not (type(pr) is dict and len(pr) == 2 and type(label) is str
                    and 0 < len(label) <= MAX_SLICE_CHARS
                    and (type(score) is float or type(score) is int) and 0 <= score <= 1):
                raise TypeError("needs validation")
            u.prediction = FastPrediction(label, float(score))
        u.cluster, u.distance, u.ood, u.model_version = c, x, o, m = (
            d.get("cluster"), d.get("distance"), d.get("ood"), d.get("model_version"))
        u.label, u.loss, u.error = lb, ls, e = d.get("label"), d.get("loss"), d.get("error")
        u.late_label = late = d.get("late_label", False)
        u.reference_id = r = d.get("reference_id")
        if ((r is not None and type(r) is not str)
                or (c is not None and type(c) is not int) or (o is not None and type(o) is not bool)
                or (x is not None and type(x) is not float and type(x) is not int)
                or (m is not None and type(m) is not str)
                or (lb is not None and type(lb) is not str)
                or (ls is not None and type(ls) is not float and type(ls) is not int)
                or (e is not None and type(e) is not bool) or type(late) is not bool):
            raise TypeError("needs validation")
        return u
    except (ValueError, TypeError, KeyError):
        return SliceUpdate.model_validate_json(raw)


def _alarm_fields(slice_id: str, alarm: Mapping[str, Any]) -> dict[str, Any]:
    """The ``alarm`` log line's fields: the slice and detector, since when (onset) and when it
    crossed, as UTC date-times of event time, and the statistic against its threshold."""
    return {"slice": slice_id, "detector": alarm["detector"],
            "onset": _utc_iso(alarm["onset_time"]), "detected_at": _utc_iso(alarm["time"]),
            "statistic": round(float(alarm["statistic"]), 2),
            "threshold": round(float(alarm["threshold"]), 2)}


def _utc_iso(t: float | None) -> str | None:
    """Seconds since 1970 as the API's UTC date-time (``2026-11-16T06:32:05Z``)."""
    return None if t is None else iso(datetime.fromtimestamp(t, UTC))


def _summary(model: SliceModel, g: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the API and the failure book read about a slice without owning it (``g``: its
    :meth:`~SliceModel.gauges`, if already computed)."""
    g = model.gauges() if g is None else g
    return {"template": model.template, "dims": model.dims, "n": model.n,
            "last_time": getattr(model, "last_time", None), "ratios": g.get("ratios", {}),
            "ood_ratio": g.get("ood_ratio"), "open": sorted(getattr(model, "open", {}))}


def _drained(records: Mapping[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A partition's loaded records one at a time: drained (each decoded as it comes, its bytes
    dropped) when the store says how (:class:`~driftline.consumers.checkpoint.StoredRecords`)."""
    drain = getattr(records, "drain", None)
    return drain() if drain is not None else iter(records.items())


def _generation(consumer: Any) -> int | None:
    """The consumer's group generation (None if it cannot say, e.g. a test double)."""
    try:
        return int(consumer.group_metadata().generation_id)
    except Exception:  # noqa: BLE001 - an attribute read, never worth failing the stage
        return None
