"""A fresh consumer group forms in one join (real broker): kafka-python 3.0.12 otherwise joins
with an empty metadata snapshot and rebalances again at once, and in CI such a second join
sometimes never completed, leaving a worker without partitions."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from kafka import ConsumerRebalanceListener

from driftline.consumers.kafka_io import (
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
