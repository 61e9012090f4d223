"""The local stack is the real thing: Apache Kafka, Redis with AOF, Prometheus, Alertmanager."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import httpx
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from driftline.localstack import Stack

pytestmark = pytest.mark.integration

T = TypeVar("T")
N_RECORDS = 50


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def make_topic(bootstrap: str, partitions: int = 1) -> str:
    topic = f"stack-test-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    return topic


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value in values:
            producer.send(topic, value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )


def drain(consumer: KafkaConsumer, want: int, timeout: float) -> list[bytes]:
    """Poll until `want` records arrived (or the timeout passed); return their values."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    return got


def test_consumer_group_commits_and_resumes(kafka_bootstrap: str) -> None:
    topic = make_topic(kafka_bootstrap)
    tp = TopicPartition(topic, 0)
    group = f"stack-test-group-{uuid.uuid4().hex[:8]}"
    values = [f"record-{i}".encode() for i in range(N_RECORDS)]
    produce(kafka_bootstrap, topic, values)

    first = group_consumer(kafka_bootstrap, topic, group)
    try:
        assert drain(first, N_RECORDS, timeout=60) == values
        first.commit()
        assert first.committed(tp) == N_RECORDS
    finally:
        first.close()

    second = group_consumer(kafka_bootstrap, topic, group)
    try:
        assert second.committed(tp) == N_RECORDS
        # Join the group, then make sure the first poll after joining brings nothing old.
        wait_for(lambda: second.poll(timeout_ms=200) == {} and second.assignment(), 60, "join")
        assert second.position(tp) == N_RECORDS
        assert drain(second, 1, timeout=2) == []
        # The group is live, not stuck: a new record is delivered, and only that one.
        produce(kafka_bootstrap, topic, [b"after-reopen"])
        assert drain(second, 1, timeout=30) == [b"after-reopen"]
        second.commit()
        assert second.committed(tp) == N_RECORDS + 1
    finally:
        second.close()


def test_redis_round_trip_with_aof(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        key = f"stack-test:{uuid.uuid4().hex}"
        client.set(key, "value", ex=300)
        assert client.get(key) == "value"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        persistence: dict[str, object] = client.info("persistence")  # type: ignore[assignment]
        assert persistence["aof_enabled"] == 1
    finally:
        client.close()


def test_prometheus_and_alertmanager_answer(prometheus_url: str, alertmanager_url: str) -> None:
    with httpx.Client(timeout=10) as http:
        assert http.get(f"{prometheus_url}/-/ready").status_code == 200
        assert http.get(f"{alertmanager_url}/-/ready").status_code == 200
        build = http.get(f"{prometheus_url}/api/v1/status/buildinfo").json()
        assert build["status"] == "success"

        name = f"DriftlineStackTest{uuid.uuid4().hex[:8]}"
        now = datetime.now(UTC)
        alert = {
            "labels": {"alertname": name, "severity": "info", "station": "s1"},
            "annotations": {"summary": "posted by the stack test"},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(minutes=5)).isoformat(),
        }
        posted = http.post(f"{alertmanager_url}/api/v2/alerts", json=[alert])
        assert posted.status_code == 200, posted.text

        def listed() -> list[dict[str, object]] | None:
            response = http.get(
                f"{alertmanager_url}/api/v2/alerts", params={"filter": f'alertname="{name}"'}
            )
            response.raise_for_status()
            found: list[dict[str, object]] = response.json()
            return found or None

        found = wait_for(listed, 10, "the alert to be listed")
        assert len(found) == 1
        assert found[0]["labels"] == alert["labels"]
        assert found[0]["status"] == {"state": "active", "silencedBy": [], "inhibitedBy": []}


def test_prometheus_knows_the_stack_alertmanager(stack: Stack) -> None:
    if stack.is_external("prometheus"):
        pytest.skip("an external Prometheus has its own Alertmanager configuration")
    url = f"{stack.prometheus_url}/api/v1/alertmanagers"
    with httpx.Client(timeout=10) as http:

        def active() -> list[str] | None:
            data = http.get(url).json()["data"]
            return [am["url"] for am in data["activeAlertmanagers"]] or None

        urls = wait_for(active, 30, "Prometheus to discover the Alertmanager")
    assert urls == [f"{stack.alertmanager_url}/api/v2/alerts"]


def test_broker_is_apache_kafka(stack: Stack) -> None:
    if stack.is_external("kafka"):
        pytest.skip("the release of a broker given by DRIFTLINE_KAFKA_BOOTSTRAP is not known")
    assert stack.kafka_version is not None
    assert re.match(r"^[34]\.\d+\.\d+", stack.kafka_version)
    log = stack.log_file("kafka")
    assert log is not None
    assert f"Kafka version: {stack.kafka_version}" in log.read_text()


def test_redis_restart_keeps_address_and_data(stack: Stack) -> None:
    if stack.is_external("redis"):
        pytest.skip("only a Redis the stack started can be restarted")
    url = stack.redis_url
    key = f"stack-test:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.set(key, "kept")
    client.close()

    stack.restart("redis")

    assert stack.redis_url == url
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        assert client.get(key) == "kept"  # replayed from the append-only file
    finally:
        client.close()


def test_kafka_restart_keeps_address_and_offsets(stack: Stack) -> None:
    if stack.is_external("kafka"):
        pytest.skip("only a broker the stack started can be restarted")
    bootstrap = stack.kafka_bootstrap
    topic = make_topic(bootstrap)
    tp = TopicPartition(topic, 0)
    group = f"stack-test-group-{uuid.uuid4().hex[:8]}"
    produce(bootstrap, topic, [b"a", b"b", b"c"])
    consumer = group_consumer(bootstrap, topic, group)
    try:
        assert drain(consumer, 3, timeout=60) == [b"a", b"b", b"c"]
        consumer.commit()
    finally:
        consumer.close()

    stack.restart("kafka")

    assert stack.kafka_bootstrap == bootstrap
    produce(bootstrap, topic, [b"d"])
    consumer = group_consumer(bootstrap, topic, group)
    try:
        assert consumer.committed(tp) == 3
        assert drain(consumer, 1, timeout=60) == [b"d"]
    finally:
        consumer.close()
