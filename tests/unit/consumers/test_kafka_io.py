from __future__ import annotations

import logging
import os
import socket
from types import SimpleNamespace

import pytest
from kafka.record import default_records, util
from kafka.record._crc32c import crc as pure_python_crc32c
from prometheus_client import CollectorRegistry
from tenacity import stop_after_attempt, wait_none

from driftline.consumers import kafka_io
from driftline.consumers.kafka_io import ProgressLog
from driftline.metrics import ConsumerMetrics


def test_kafka_python_uses_the_c_crc32c() -> None:
    """Without the ``crc32c`` package kafka-python checksums every fetched and produced batch in
    pure Python at ~2.5 MB/s: 20 ms of CPU per 150 kB image event, twice the model's time."""
    assert util._crc32c is not pure_python_crc32c
    data = os.urandom(4096)
    assert default_records.calc_crc32c(memoryview(data)) == pure_python_crc32c(data)


def test_producers_refuse_records_past_the_size_the_dead_letter_caps_are_derived_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, object]] = []
    monkeypatch.setattr(kafka_io, "KafkaProducer", lambda **config: made.append(config))
    kafka_io.make_producer("broker:9092")
    assert made[0]["max_request_size"] == kafka_io.PRODUCER_MAX_REQUEST_BYTES
    # the worst dead-letter record: base64 of the largest value kept, the largest key kept
    # twice, a detail at its worst JSON escaping
    worst = 4 * kafka_io.DLQ_MAX_VALUE_BYTES // 3 + 7 * kafka_io.DLQ_MAX_KEY_BYTES + 6 * 2000
    assert worst < 0.8 * kafka_io.PRODUCER_MAX_REQUEST_BYTES


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(monkeypatch: pytest.MonkeyPatch) -> tuple[ProgressLog, _Clock]:
    clock = _Clock()
    monkeypatch.setattr(kafka_io.time, "monotonic", clock)
    return ProgressLog("embed", every_s=30), clock


def test_waiting_for_an_unreachable_broker_names_the_address_and_the_setting(
        caplog: pytest.LogCaptureFixture) -> None:
    """While the broker cannot be reached at start-up, driftline said nothing for up to
    ``BROKER_WAIT_S`` (kafka-python's lines name ``bootstrap-0``, not the address); each retry
    now logs the address, the setting, how long it has waited and when it gives up."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{free.getsockname()[1]}"  # closed once the block ends
    caplog.set_level(logging.WARNING, logger="driftline.consumers.kafka_io")
    starting = kafka_io.make_producer.retry_with(stop=stop_after_attempt(2), wait=wait_none())
    with pytest.raises(kafka_io.RetriableError):
        starting(address, bootstrap_timeout_ms=200)
    waits = [r for r in caplog.records if r.name == "driftline.consumers.kafka_io"]
    assert [r.getMessage() for r in waits] == ["waiting for Kafka to start a producer"]
    line = waits[0].__dict__
    assert line["bootstrap"] == address and line["setting"] == "DRIFTLINE_KAFKA_BOOTSTRAP"
    assert line["gives_up_after_s"] == kafka_io.BROKER_WAIT_S
    assert line["error"].startswith("KafkaTimeoutError") and line["waited_s"] >= 0.1


def test_progress_log_lag_and_one_line_per_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    progress, clock = _progress(monkeypatch)
    caplog.set_level(logging.INFO, logger=kafka_io.__name__)
    # partition 2 has nothing read yet; partition 3 has no fetch response: no lag reading
    lag = progress.tick({0: 10, 1: 7, 2: None, 3: 4}, {0: 15, 1: 7, 2: 9, 3: None})
    assert lag == {0: 5, 1: 0}
    assert not caplog.records  # less than an interval: lag only
    progress.count(12)
    clock.now = 30.0
    progress.tick({0: 10, 1: 7, 2: None, 3: 4}, {0: 15, 1: 7, 2: 9, 3: None})
    [line] = caplog.records
    assert line.levelno == logging.INFO and line.getMessage() == "embed progress"
    assert line.processed == 12 and line.per_s == 0.4  # type: ignore[attr-defined]


def test_progress_log_warns_about_partitions_that_do_not_move(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    progress, clock = _progress(monkeypatch)
    caplog.set_level(logging.INFO, logger=kafka_io.__name__)
    high = {0: 50, 1: 50, 2: 50, 3: None}
    clock.now = 30.0
    progress.tick({0: 10, 1: 10, 2: 50, 3: None}, high)  # first line: nothing to compare yet
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    caplog.clear()
    clock.now = 60.0
    # 0 did not move and is behind; 1 moved; 2 is idle at the log end; 3 never got a response
    progress.tick({0: 10, 1: 20, 2: 50, 3: None}, high)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert warning[0].behind == {0: 40}  # type: ignore[attr-defined]
    assert warning[0].no_fetch_response == [3]  # type: ignore[attr-defined]
    caplog.clear()
    clock.now = 90.0
    progress.tick({0: 11, 1: 30, 2: 50, 3: None}, {0: 50, 1: 50, 2: 50, 3: 0})
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_progress_log_lag_of_one_on_a_quiet_log_is_not_a_stall(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a transaction's commit marker sits at the log end and is never returned as a record
    progress, clock = _progress(monkeypatch)
    caplog.set_level(logging.INFO, logger=kafka_io.__name__)
    for now in (30.0, 60.0, 90.0):
        clock.now = now
        progress.tick({0: 41}, {0: 42})
    assert all(r.levelno == logging.INFO for r in caplog.records)
    clock.now = 120.0  # the log moved on and we did not: stuck after all
    progress.tick({0: 41}, {0: 43})
    assert [r.behind for r in caplog.records if r.levelno == logging.WARNING] == [  # type: ignore[attr-defined]
        {0: 2}]


def test_progress_log_warns_about_a_join_that_does_not_finish(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    progress, clock = _progress(monkeypatch)
    caplog.set_level(logging.INFO, logger=kafka_io.__name__)
    states = ["<stable>", "<rebalancing>", "<stable>", "<rebalancing>", "<rebalancing>", None]
    warned = []
    for i, state in enumerate(states, start=1):
        clock.now = 30.0 * i
        caplog.clear()
        progress.tick({}, {}, state)
        warned.append(any(r.levelno == logging.WARNING for r in caplog.records))
    # a rebalance seen at one line is normal; at two lines in a row it is not finishing
    assert warned == [False, False, False, False, True, False]


def test_progress_log_says_since_when_the_membership_is_unsettled(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    progress, clock = _progress(monkeypatch)
    since = []
    for i, state in enumerate(["<stable>", "<rebalancing>", "<unjoined>", "<rebalancing>",
                               "<stable>", "<unjoined>"], start=1):
        clock.now = 30.0 * i
        progress.tick({}, {}, state)
        since.append(progress.unsettled_since)
    clock.now = 200.0
    progress.tick({}, {}, "<unjoined>")  # between lines: nothing changes
    assert since == [None, 60.0, 60.0, 60.0, None, 180.0]
    assert progress.unsettled_since == 180.0


class _Task:
    def __init__(self, done: bool) -> None:
        self.is_done = done


class _Coordinator:
    """The attributes of kafka-python 3.0.12's coordinator that JoinWatch reads."""

    def __init__(self) -> None:
        self.state = "<stable>"
        self._join_task: _Task | None = None
        self.rejoin_needed = False
        self.snapshot_differs = False

    def need_rejoin(self) -> bool:
        return self.rejoin_needed or self.snapshot_differs

    def request_rejoin(self) -> None:
        self.rejoin_needed = True


def test_join_watch_rejoins_only_a_finished_join_left_unapplied(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    monkeypatch.setattr(kafka_io.time, "monotonic", clock)
    registry = CollectorRegistry()
    watch = kafka_io.JoinWatch("detect", grace_s=1.0, metrics=ConsumerMetrics(registry))
    coordinator = _Coordinator()
    consumer = SimpleNamespace(_coordinator=coordinator)
    seen = []
    for t, state, task, differs in [
        (0.0, "<stable>", _Task(True), False),        # settled
        (1.0, "<rebalancing>", _Task(False), True),   # a join under way
        (3.0, "<rebalancing>", _Task(True), True),    # done, and the next poll will apply it
        (4.0, "<rebalancing>", _Task(True), False),   # done, never to be applied...
        (4.5, "<rebalancing>", _Task(True), False),   # ...within the grace
        (5.0, "<rebalancing>", _Task(True), False),   # past it: rejoin
    ]:
        clock.now = t
        coordinator.state, coordinator._join_task, coordinator.snapshot_differs = (
            state, task, differs)
        seen.append(watch.check(consumer))  # type: ignore[arg-type]
    assert seen == [False, False, False, False, False, True]
    assert coordinator.rejoin_needed
    assert registry.get_sample_value("driftline_kafka_forced_rejoins_total",
                                     {"stage": "detect"}) == 1
    assert "never applied" in caplog.text
    assert watch.check(SimpleNamespace()) is False  # another client: nothing to watch
