"""Small adapters over kafka-python: topics, producers and consumers with driftline's defaults."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaConnectionError, RetriableError, TopicAlreadyExistsError
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from driftline.metrics import ConsumerMetrics

log = logging.getLogger(__name__)

# Waiting this long for a broker covers a broker restart or a slow container start; past it the
# process exits and its supervisor restarts it, which an operator sees.
BROKER_WAIT_S = 120
# New topics and partitions are noticed within this long (kafka-python's default is 5 min).
METADATA_MAX_AGE_MS = 30_000
# A turn of a stage's loop waits on Redis a few seconds at most; poll intervals above this
# rebalance us out.
MAX_POLL_INTERVAL_MS = 300_000
# Each stage logs one progress line this often, and warns about partitions that do not move.
PROGRESS_LOG_S = 30.0
# The largest request our producers send (kafka-python's default, set explicitly): a bigger
# record is refused with MessageSizeTooLargeError, which stops a stage. Brokers' default
# message.max.bytes is about the same.
PRODUCER_MAX_REQUEST_BYTES = 1 << 20
# A dead-letter record carries the original value in base64 (4/3 of its size), the original key
# (as the record's key and in its JSON), a detail of at most 2000 characters and a few short
# fields. Past these sizes only a prefix of the value and of the key is kept: 4/3 of 512 KiB is
# 683 KiB of base64, and the rest (key and detail at their worst JSON escaping) under 45 KiB,
# well inside PRODUCER_MAX_REQUEST_BYTES. Real keys are a station or an event id.
DLQ_MAX_VALUE_BYTES = PRODUCER_MAX_REQUEST_BYTES // 2
DLQ_MAX_KEY_BYTES = 4096

# what each start-up call waits for the broker to do, in its "waiting for Kafka" line
_WAITING_TO = {"ensure_topics": "create the topics", "make_producer": "start a producer",
               "make_consumer": "start a consumer"}


def _waiting_for_broker(state: RetryCallState) -> None:
    """One line per retry while the broker cannot be reached: kafka-python's own lines name
    ``bootstrap-0`` and a backoff, not the address, the setting or how long is left."""
    fn = getattr(state.fn, "__name__", "")
    log.warning(f"waiting for Kafka to {_WAITING_TO.get(fn, fn)}", extra={
        "bootstrap": state.args[0] if state.args else state.kwargs.get("bootstrap"),
        "setting": "DRIFTLINE_KAFKA_BOOTSTRAP",
        "waited_s": round(state.seconds_since_start or 0, 1), "gives_up_after_s": BROKER_WAIT_S,
        "error": repr(state.outcome.exception() if state.outcome else None)})


_retry_broker = retry(
    retry=retry_if_exception_type((KafkaConnectionError, RetriableError)),
    wait=wait_exponential(multiplier=0.2, max=5),
    stop=stop_after_delay(BROKER_WAIT_S),
    before_sleep=_waiting_for_broker,
    reraise=True,
)


@_retry_broker
def ensure_topics(bootstrap: str, topics: dict[str, int], **overrides: Any) -> None:
    """Create missing topics with the given partition counts (replication 1 is the local default;
    production clusters create topics with their own policy); ``overrides``: admin client
    settings."""
    admin = KafkaAdminClient(**{"bootstrap_servers": bootstrap, "client_id": "driftline-admin",
                                **overrides})
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, num_partitions=n, replication_factor=1)
               for name, n in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
                log.info("created topics", extra={"topics": [t.name for t in new]})
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


@_retry_broker
def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """An idempotent producer that keeps per-key order (acks=all, idempotence on)."""
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
        retries=2**31 - 1, max_in_flight_requests_per_connection=5, client_id="driftline",
        max_request_size=PRODUCER_MAX_REQUEST_BYTES,
    )
    config.update(overrides)
    return KafkaProducer(**config)


@_retry_broker
def make_consumer(bootstrap: str, group: str, session_timeout_ms: int = 20_000,
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits; callers subscribe with their rebalance listener.

    ``session_timeout_ms`` is how long the group waits for a member that stopped heartbeating
    (a crashed or SIGKILLed worker) before handing its partitions to the others; heartbeats go
    every third of it. kafka-python runs rebalance listeners on its I/O loop, so heartbeats also
    wait while a listener runs: the detect stage's revoke checkpoint (a few seconds for 10,000
    dirty slices at most; it gives up on Redis within half the session) — its loads on
    assignment run in the poll loop. 20 s leaves room for that and still moves a crashed
    worker's partitions in well under the 45 s of kafka-python's default.
    """
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        client_id=unique_client_id(group), metadata_max_age_ms=METADATA_MAX_AGE_MS,
        session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=session_timeout_ms // 3,
    )
    config.update(overrides)
    return KafkaConsumer(**config)


def unique_client_id(group: str) -> str:
    """``<group>-<host>-<pid>-<random>``: names this consumer among its group's members in
    broker logs and group descriptions."""
    return f"{group}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def wait_for_topic(consumer: KafkaConsumer, topic: str, timeout_s: float = BROKER_WAIT_S) -> None:
    """Block until the consumer's metadata knows ``topic``'s partitions.

    Joining a group before that makes the leader assign this member nothing ("no partition
    metadata"), and it would sit idle until the next metadata refresh.
    """
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic):
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic!r} has no partitions after {timeout_s:.0f} s; "
                               "is it created (DRIFTLINE_TOPIC_PARTITIONS) and the broker up?")
        time.sleep(0.2)


def subscribe_when_ready(consumer: KafkaConsumer, topic: str, listener: Any,
                         timeout_s: float = BROKER_WAIT_S) -> None:
    """Subscribe to ``topic`` once its partitions are known, so the first join assigns them.

    Also hands the consumer's group coordinator the current metadata: kafka-python 3.0.12
    snapshots the subscribed topics' partitions only when a metadata response arrives, and the
    one that :func:`wait_for_topic` caused arrived before the subscription. Joining with that
    empty snapshot makes the leader rebalance again as soon as the next response arrives —
    an extra rebalance at most starts, and in CI such a rejoin once never completed (the
    worker sat without partitions for minutes).
    """
    wait_for_topic(consumer, topic, timeout_s)
    consumer.subscribe([topic], listener=listener)
    coordinator = getattr(consumer, "_coordinator", None)
    refresh = getattr(coordinator, "_handle_metadata_update", None)
    cluster = getattr(coordinator, "_cluster", None)
    if refresh is not None and cluster is not None:
        try:
            refresh(cluster)
        except Exception as exc:  # an optimisation only: the join still works, maybe twice
            log.warning("could not refresh the group coordinator's metadata snapshot",
                        extra={"error": repr(exc)})
    else:  # another kafka-python: the extra rebalance costs time, not correctness
        log.debug("no coordinator metadata hook; the first join may rebalance twice")


def highwaters(consumer: KafkaConsumer, topic: str, partitions: Any) -> dict[int, int | None]:
    """The high watermark each partition's last fetch response carried (None: no response yet).

    No broker request: kafka-python 3.0.12's ``end_offsets`` (and ``position``, which may refresh
    offsets) can block during a rebalance — an embed worker once sat in ``end_offsets`` for good.
    """
    out: dict[int, int | None] = {}
    for p in partitions:
        try:
            out[p] = consumer.highwater(TopicPartition(topic, p))
        except Exception as exc:  # revoked meanwhile: no reading
            log.debug("no high watermark", extra={"partition": p, "error": str(exc)})
            out[p] = None
    return out


class JoinWatch:
    """Notices a group join whose result kafka-python 3.0.12 never applies, and rejoins.

    kafka-python runs JoinGroup → SyncGroup as a task on its I/O thread (``_join_task``) and
    applies the result (assignment, state ``<stable>``, heartbeats) only in a ``poll()`` that is
    awaiting that task; a ``poll(timeout_ms=…)`` that times out leaves the task running, and the
    next ``poll()`` awaits it again only while ``need_rejoin()`` says so. When the leader rejoins
    because its metadata snapshot changed (new partitions on the topic; at start-up, the empty
    snapshot :func:`subscribe_when_ready` avoids), ``need_rejoin()`` turns False as soon as the
    task performs the assignment, so a task that ends between two polls is never applied: the
    member stays ``<rebalancing>`` with heartbeats off and no partitions, the broker drops it after
    the session timeout, and nothing joins again. (A rebalance that another member starts is
    not affected: the broker's REBALANCE_IN_PROGRESS sets a flag that stays until applied.)

    Call :meth:`check` after each ``poll()``: once that state has lasted ``grace_s`` it asks for
    a rejoin — one more rebalance — and logs a warning. It reads coordinator attributes and sets
    the coordinator's rejoin flag (:func:`request_rejoin`); with another kafka-python, which lacks
    them, it does nothing.
    """

    def __init__(self, stage: str, grace_s: float = 1.0,
                 metrics: ConsumerMetrics | None = None) -> None:
        self.stage, self.grace_s, self.metrics = stage, grace_s, metrics
        self._since: float | None = None

    def check(self, consumer: KafkaConsumer) -> bool:
        """True if it asked for a rejoin."""
        coordinator = getattr(consumer, "_coordinator", None)
        try:
            task = coordinator._join_task  # type: ignore[union-attr]
            stalled = bool(task is not None and task.is_done
                           and coordinator.state != "<stable>"  # type: ignore[union-attr]
                           and not coordinator.need_rejoin())  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - another kafka-python: nothing to watch
            return False
        if not stalled:
            self._since = None
            return False
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since < self.grace_s:
            return False
        self._since = None
        log.warning(f"{self.stage}: kafka-python finished a group join but never applied it; "
                    "rejoining", extra={"group": coordinator.state})  # type: ignore[union-attr]
        request_rejoin(consumer)
        if self.metrics is not None:
            self.metrics.forced_rejoins.labels(self.stage).inc()
        return True


def request_rejoin(consumer: KafkaConsumer) -> bool:
    """Ask kafka-python's coordinator to rejoin the group at the next ``poll()`` (one more
    rebalance; a flag write, safe from the polling thread). False if this kafka-python has no
    such hook."""
    hook = getattr(getattr(consumer, "_coordinator", None), "request_rejoin", None)
    if hook is None:
        return False
    hook()
    return True


def group_state(consumer: KafkaConsumer) -> str | None:
    """kafka-python's view of this member: ``<stable>``, ``<rebalancing>`` or ``<unjoined>``
    (None if this kafka-python does not say). A read of one attribute, no request."""
    state = getattr(getattr(consumer, "_coordinator", None), "state", None)
    return state if isinstance(state, str) else None


class ProgressLog:
    """Consumer lag per owned partition, and one INFO line per ``every_s`` for a stage: records
    processed, positions, lag; plus a WARNING naming any partition that is behind but did not
    move over a whole interval, or that was owned a whole interval without one fetch response.
    At 3 a.m. this tells a consumer that polls but gets nothing from an idle one; the lines come
    from the poll loop, so a loop parked in a call shows as lines that stop.
    """

    def __init__(self, role: str, every_s: float = PROGRESS_LOG_S,
                 metrics: ConsumerMetrics | None = None) -> None:
        self.role, self.every, self.metrics = role, every_s, metrics
        self._last = time.monotonic()
        self._processed = 0
        self._seen: dict[int, int | None] = {}  # positions at the previous line
        self._high: dict[int, int | None] = {}  # and high watermarks
        self._unsettled = False  # group membership was not stable at the previous line
        # first progress line of the current run of lines with the membership not stable:
        # liveness fails a worker whose join never finishes (see ``Service.liveness``)
        self.unsettled_since: float | None = None

    def count(self, n: int) -> None:
        self._processed += n

    def report(self, consumer: KafkaConsumer, topic: str,
               positions: dict[int, int | None]) -> None:
        """The stage's call: read what the last fetch responses and the coordinator say (no
        broker request), :meth:`tick`, and set the lag and assignment gauges."""
        lag = self.tick(positions, highwaters(consumer, topic, positions), group_state(consumer))
        if self.metrics is not None:
            self.metrics.assigned.labels(self.role).set(len(positions))
            for p, n in lag.items():
                self.metrics.lag.labels(self.role, str(p)).set(n)

    def forget(self, partitions: Any) -> None:
        """Drop the lag gauges of partitions this worker no longer owns: their new owner reports
        them, and a stale series would be summed with its."""
        if self.metrics is None:
            return
        for p in partitions:
            try:
                self.metrics.lag.remove(self.role, str(p))
            except KeyError:  # never reported
                pass

    def tick(self, positions: dict[int, int | None], highwater: dict[int, int | None],
             group: str | None = None) -> dict[int, int]:
        """``positions``: next offset per owned partition (None: nothing read yet);
        ``highwater`` from :func:`highwaters`; ``group`` from :func:`group_state`. Returns the
        lag of partitions with a reading."""
        lag = {p: max(0, high - pos) for p, pos in positions.items()
               if pos is not None and (high := highwater.get(p)) is not None}
        now = time.monotonic()
        elapsed = now - self._last
        if elapsed < self.every:
            return lag
        log.info(f"{self.role} progress", extra={
            "processed": self._processed, "per_s": round(self._processed / elapsed, 1),
            "positions": positions, "lag": lag, "group": group})
        unsettled = group is not None and group != "<stable>"
        if unsettled and self._unsettled:  # two lines in a row: a join that does not finish
            log.warning(f"{self.role}: consumer group membership not stable at two progress "
                        "lines in a row; kafka-python's coordinator log says which step it "
                        "waits on", extra={"group": group})
        self._unsettled = unsettled
        if not unsettled:
            self.unsettled_since = None
        elif self.unsettled_since is None:
            self.unsettled_since = now
        # behind and not moving; a lag of 1 on a quiet log can be a transaction marker that
        # is never returned as a record, so it counts only once the log end moved on
        stalled = {p: n for p, n in lag.items()
                   if self._seen.get(p, -1) == positions[p]
                   and (n > 1 or (n == 1 and self._high.get(p) != highwater.get(p)))}
        unfetched = sorted(p for p in positions if highwater.get(p) is None and p in self._seen)
        if stalled or unfetched:
            log.warning(f"{self.role}: owned partitions made no progress for {elapsed:.0f} s",
                        extra={"behind": stalled, "no_fetch_response": unfetched})
        self._seen, self._high = dict(positions), dict(highwater)
        self._processed = 0
        self._last = now
        return lag
