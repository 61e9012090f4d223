"""A fresh consumer group forms in one join (real broker): kafka-python 3.0.12 otherwise joins
with an empty metadata snapshot and rebalances again at once, and in CI such a second join
sometimes never completed, leaving a worker without partitions — a join kafka-python finished but
never applied, which JoinWatch notices and rejoins."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from kafka import ConsumerRebalanceListener, KafkaAdminClient
from kafka.admin import NewPartitions

from driftline.consumers.kafka_io import (
    JoinWatch,
    ensure_topics,
    group_state,
    make_consumer,
    subscribe_when_ready,
)

pytestmark = pytest.mark.integration


class Moves(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.assigned: list[set[int]] = []
        self.revoked: list[set[int]] = []

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.assigned.append({tp.partition for tp in assigned})

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.revoked.append({tp.partition for tp in revoked})


@pytest.mark.parametrize("trial", range(4))
def test_a_new_group_is_assigned_once(kafka_bootstrap: str, trial: int) -> None:
    name = uuid.uuid4().hex[:8]
    topic = f"join{name}.events"
    # another topic created alongside, as the service creates all of its topics at start
    ensure_topics(kafka_bootstrap, {topic: 3, f"join{name}.other": 1})
    consumer = make_consumer(kafka_bootstrap, f"join{name}")
    moves = Moves()
    try:
        subscribe_when_ready(consumer, topic, moves)
        deadline = time.monotonic() + 4.0  # past several metadata round trips
        while time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)
        # what the progress log reports: kafka-python's own view of the membership
        assert group_state(consumer) == "<stable>"
    finally:
        consumer.close(autocommit=False)
    assert moves.assigned[:1] == [{0, 1, 2}], moves.assigned
    assert moves.assigned == [{0, 1, 2}], f"rebalanced again: {moves.assigned}"
    assert moves.revoked[:1] == [set()] and {0, 1, 2} not in moves.revoked[:-1]


def test_a_join_left_unapplied_after_the_topic_grows_is_rejoined(kafka_bootstrap: str) -> None:
    """The topic gains a partition: the leader rejoins on its own metadata, and when that join
    ends between two polls kafka-python 3.0.12 never applies it (polling with no wait makes that
    certain). JoinWatch notices and rejoins, and the member owns both partitions."""
    name = uuid.uuid4().hex[:8]
    topic = f"grow{name}"
    ensure_topics(kafka_bootstrap, {topic: 1})
    consumer = make_consumer(kafka_bootstrap, f"grow{name}", metadata_max_age_ms=500)
    moves, watch = Moves(), JoinWatch("test")
    nudges = 0
    try:
        subscribe_when_ready(consumer, topic, moves)
        deadline = time.monotonic() + 30
        while moves.assigned[-1:] != [{0}] and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)
        assert moves.assigned == [{0}] and group_state(consumer) == "<stable>"
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.create_partitions({topic: NewPartitions(2)})
        finally:
            admin.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # no wait until the watch steps in (then a join always ends between polls); then
            # as the stages poll (a rejoin that is pending keeps being awaited by later polls)
            consumer.poll(timeout_ms=200 if nudges else 0)
            nudges += watch.check(consumer)
            if moves.assigned[-1] == {0, 1} and group_state(consumer) == "<stable>":
                break
            time.sleep(0.05)
    finally:
        consumer.close(autocommit=False)
    assert moves.assigned[-1] == {0, 1}, (moves.assigned, nudges)
    assert nudges >= 1  # the stuck join happened, and a rejoin mended it
