"""Small adapters over kafka-python: topics, producers and consumers with driftline's defaults."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaConnectionError, RetriableError, TopicAlreadyExistsError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)

# Waiting this long for a broker covers a broker restart or a slow container start; past it the
# process exits and its supervisor restarts it, which an operator sees.
BROKER_WAIT_S = 120
# New topics and partitions are noticed within this long (kafka-python's default is 5 min).
METADATA_MAX_AGE_MS = 30_000
# A detect batch may wait on Redis while it restarts; poll intervals above this rebalance us out.
MAX_POLL_INTERVAL_MS = 300_000
# A consumer without partitions this long, while its group leaves some unowned, is rebuilt.
REJOIN_WATCHDOG_S = 45.0

_retry_broker = retry(
    retry=retry_if_exception_type((KafkaConnectionError, RetriableError)),
    wait=wait_exponential(multiplier=0.2, max=5),
    stop=stop_after_delay(BROKER_WAIT_S),
    reraise=True,
)


@_retry_broker
def ensure_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create missing topics with the given partition counts (replication 1 is the local default;
    production clusters create topics with their own policy)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="driftline-admin")
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
    )
    config.update(overrides)
    return KafkaProducer(**config)


@_retry_broker
def make_consumer(bootstrap: str, group: str, **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits; callers subscribe with their rebalance listener."""
    config: dict[str, Any] = dict(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        client_id=unique_client_id(group), metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )
    config.update(overrides)
    return KafkaConsumer(**config)


def unique_client_id(group: str) -> str:
    """``<group>-<host>-<pid>-<random>``: names this consumer among its group's members (in
    broker logs and in :class:`AssignmentWatchdog`'s group description)."""
    return f"{group}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def partitions_to_rebuild_for(group: dict[str, Any], topic: str, n_partitions: int,
                              client_id: str) -> list[int]:
    """From a ``KafkaAdminClient.describe_groups`` entry: the partitions of ``topic`` that a
    consumer holding none should take back by rejoining — all of them while the group is not
    ``Stable``, else those no member owns plus those the broker still credits to ``client_id``.
    Empty for an idle member of a group with more members than partitions.

    >>> desc = {"group_state": "Stable", "members": [
    ...     {"client_id": "a", "member_assignment": {"assigned_partitions": [
    ...         {"topic": "t", "partitions": [0]}]}},
    ...     {"client_id": "b", "member_assignment": {"assigned_partitions": []}}]}
    >>> partitions_to_rebuild_for(desc, "t", 2, "b"), partitions_to_rebuild_for(desc, "t", 1, "b")
    ([1], [])
    >>> partitions_to_rebuild_for(desc, "t", 1, "a")
    [0]
    """
    if group.get("group_state") != "Stable":
        return list(range(n_partitions))
    owned: set[int] = set()
    mine: set[int] = set()
    for member in group.get("members", []):
        assignment = member.get("member_assignment") or {}
        for part in assignment.get("assigned_partitions", []):
            if part.get("topic") == topic:
                owned.update(part["partitions"])
                if member.get("client_id") == client_id:
                    mine.update(part["partitions"])
    return sorted(mine | (set(range(n_partitions)) - owned))


class AssignmentWatchdog:
    """Spots a consumer that has sat without partitions while its group needs it.

    kafka-python 3.0.x can leave a consumer mid-rejoin after a rebalance for good: revoked and
    never assigned again, polling nothing (seen on this project's loaded CI machine; the group
    waits for it). After ``limit_s`` without partitions, one admin call describes the group; if
    partitions of ``topic`` are unowned, or still credited to this consumer, or the group is not
    stable, :meth:`check` says so once and the stage rebuilds its consumer. An idle member of a
    group with more members than partitions is left alone.
    """

    def __init__(self, bootstrap: str, group: str, topic: str,
                 limit_s: float = REJOIN_WATCHDOG_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.limit_s, self.clock = limit_s, clock
        self.since: float | None = None

    def check(self, consumer: KafkaConsumer) -> bool:
        """Call once per loop: True when the consumer should be closed and built afresh."""
        now = self.clock()
        if consumer.assignment():
            self.since = None
            return False
        if self.since is None:
            self.since = now
        if now - self.since < self.limit_s:
            return False
        self.since = now  # at most one group description per limit_s
        try:
            n = len(consumer.partitions_for_topic(self.topic) or ())
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                     client_id=f"{self.group}-watchdog")
            try:
                desc = admin.describe_groups([self.group]).get(self.group, {})
            finally:
                admin.close()
        except Exception as exc:  # the broker may be down: polling goes on, check again later
            log.warning("consumer without partitions; group not described",
                        extra={"group": self.group, "error": repr(exc)})
            return False
        client_id = consumer.config.get("client_id", "")
        need = partitions_to_rebuild_for(desc, self.topic, n, client_id)
        if need:
            log.error("consumer without partitions while its group needs it: rebuilding it",
                      extra={"group": self.group, "topic": self.topic, "partitions": need,
                             "group_state": desc.get("group_state"),
                             "seconds": round(self.limit_s)})
        return bool(need)


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


def consumer_lag(consumer: KafkaConsumer, partitions: Iterable[Any]) -> dict[int, int]:
    """Messages behind the log end, per assigned partition, from what the consumer already knows:
    the high watermark its last fetch response carried minus its position. No broker request:
    kafka-python 3.0.12's ``end_offsets`` can block forever when called while the group is
    rebalancing (seen here: an embed worker stuck in it for good). Partitions not fetched yet
    have no reading.
    """
    lag = {}
    for tp in partitions:
        try:
            high = consumer.highwater(tp)
            pos = None if high is None else consumer.position(tp, timeout_ms=0)
            if high is not None and pos is not None:
                lag[tp.partition] = max(0, high - pos)
        except Exception as exc:  # revoked meanwhile, or position unknown: no reading
            log.debug("no lag reading", extra={"partition": tp.partition, "error": str(exc)})
    return lag
