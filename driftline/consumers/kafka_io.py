"""Small adapters over kafka-python: topics, producers and consumers with driftline's defaults."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
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


def consumer_lag(consumer: KafkaConsumer, next_offsets: dict[Any, int]) -> dict[int, int]:
    """Messages behind the log end per partition: the high watermark the consumer's last fetch
    response carried minus the next offset the caller will process. No broker request:
    kafka-python 3.0.12's ``end_offsets`` (and ``position``, which may refresh offsets) can
    block during a rebalance — an embed worker once sat in ``end_offsets`` for good. Partitions
    not fetched yet have no reading.
    """
    lag = {}
    for tp, nxt in next_offsets.items():
        try:
            high = consumer.highwater(tp)
        except Exception as exc:  # revoked meanwhile: no reading
            log.debug("no lag reading", extra={"partition": tp.partition, "error": str(exc)})
            continue
        if high is not None:
            lag[tp.partition] = max(0, high - nxt)
    return lag
