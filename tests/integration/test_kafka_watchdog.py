"""AssignmentWatchdog against a real broker: an idle member is left alone, a member that stops
rejoining is spotted, and a rebuilt consumer takes its partitions back."""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

from driftline.consumers.kafka_io import AssignmentWatchdog, make_consumer, wait_for_topic
from driftline.localstack import Stack

pytestmark = pytest.mark.integration


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"watchdog-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()
    return name


def _join(bootstrap: str, group: str, topic: str) -> KafkaConsumer:
    consumer = make_consumer(bootstrap, group, session_timeout_ms=30_000)
    wait_for_topic(consumer, topic)
    consumer.subscribe([topic])
    return consumer


def _poll_until(consumers: list[KafkaConsumer], done: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in consumers:
            c.poll(timeout_ms=100)
        if callable(done) and done():
            return
    raise AssertionError("the group did not settle in time")


def test_idle_member_is_left_alone_and_a_member_that_stops_rejoining_is_rebuilt(
    stack: Stack
) -> None:
    bootstrap, group = stack.kafka_bootstrap, f"g-{uuid.uuid4().hex[:6]}"
    topic = _topic(bootstrap, 1)
    a, b = _join(bootstrap, group, topic), _join(bootstrap, group, topic)
    try:
        _poll_until([a, b], lambda: len(a.assignment()) + len(b.assignment()) == 1)
        idle, busy = (a, b) if not a.assignment() else (b, a)
        watch = AssignmentWatchdog(bootstrap, group, topic, limit_s=0.0)
        # one partition, two members: the idle one is not needed, whatever the wait
        assert watch.check(idle) is False
        assert watch.check(busy) is False

        # The busy member leaves; the idle one never polls, so it never rejoins (what a stuck
        # kafka-python consumer looks like from outside) and partition 0 is left unowned.
        busy.close(autocommit=False)
        stuck = idle
        deadline = time.monotonic() + 60
        while not watch.check(stuck):
            assert time.monotonic() < deadline, "the watchdog never saw the unowned partition"
            time.sleep(0.5)

        stuck.close(autocommit=False)
        fresh = _join(bootstrap, group, topic)
        try:
            _poll_until([fresh], lambda: bool(fresh.assignment()))
            assert {tp.partition for tp in fresh.assignment()} == {0}
            assert AssignmentWatchdog(bootstrap, group, topic, limit_s=0.0).check(fresh) is False
        finally:
            fresh.close(autocommit=False)
    finally:
        for c in (a, b):
            with contextlib.suppress(Exception):  # closing twice is harmless
                c.close(autocommit=False)
