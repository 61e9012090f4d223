"""Both log formats carry what a line is about (its ``extra=`` fields) and UTC times."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
from kafka.net.selector import NetworkSelector

from driftline.logs import ConsoleFormatter, JsonFormatter, KafkaStallFilter, configure_logging


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("driftline.consumers.detect_stage", logging.ERROR, __file__, 1,
                               "unusable slice-update skipped", None, None)
    record.__dict__.update(extra)
    record.created = 1794810725.25  # 2026-11-16T06:32:05.250Z
    return record


FIELDS = {"partition": 3, "offset": 41, "slice": "station=cam-2|shift=night",
          "error": "KeyError('baseline 7')"}


def test_console_lines_name_the_fields_and_the_utc_time() -> None:
    line = ConsoleFormatter().format(_record(**FIELDS))
    assert line.startswith("2026-11-16T06:32:05.250+00:00 ERROR   ")
    assert line.endswith("unusable slice-update skipped partition=3 offset=41 "
                         "slice=\"station=cam-2|shift=night\" "
                         "error=\"KeyError('baseline 7')\"")


def test_console_traceback_follows_the_fields() -> None:
    try:
        raise ValueError("bad arrays")
    except ValueError:
        import sys

        record = _record(stage="detect")
        record.exc_info = sys.exc_info()
    head, *trace = ConsoleFormatter().format(record).splitlines()
    assert head.endswith("stage=detect") and trace[-1] == "ValueError: bad arrays"


def test_console_fields_follow_a_multi_line_message_not_its_first_line() -> None:
    try:
        raise ValueError("bad arrays")
    except ValueError:
        import sys

        record = logging.LogRecord("driftline.reference", logging.ERROR, __file__, 1,
                                   "two problems:\nfirst\nsecond", None, sys.exc_info())
    record.__dict__.update(stage="build")
    lines = ConsoleFormatter().format(record).splitlines()
    assert lines[0].endswith("two problems:") and lines[1] == "first"
    assert lines[2] == "second stage=build" and lines[-1] == "ValueError: bad arrays"


def test_json_keeps_the_same_fields() -> None:
    doc = json.loads(JsonFormatter().format(_record(**FIELDS)))
    assert doc["time"] == "2026-11-16T06:32:05.250+00:00"
    assert {k: doc[k] for k in FIELDS} == FIELDS


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_configured_formats_show_the_fields(fmt: str, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", fmt)
        logging.getLogger("driftline.test").info("alarm", extra={"detector": "ood_rate"})
    finally:
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err
    assert re.search(r"ood_rate", err), err


def test_http_client_requests_are_not_logged_at_info(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """httpx's per-request INFO line ('HTTP Request: POST …/api/v2/alerts "HTTP/1.1 200 OK"')
    came once per Alertmanager push and every re-send, naming no incident; its warnings stay."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    libs = {name: logging.getLogger(name).level for name in ("kafka", "httpx", "httpcore")}
    try:
        configure_logging("INFO", "console")
        logging.getLogger("httpx").info('HTTP Request: POST http://am/api/v2/alerts "200 OK"')
        logging.getLogger("httpcore.connection").info("connect_tcp.started")
        logging.getLogger("httpx").warning("connection pool full")
    finally:
        root.handlers[:], root.level = handlers, level
        for name, lib_level in libs.items():
            logging.getLogger(name).setLevel(lib_level)
    err = capsys.readouterr().err
    assert "HTTP Request" not in err and "connect_tcp" not in err
    assert "connection pool full" in err


async def _busy(seconds: float) -> None:
    time.sleep(seconds)  # holds kafka-python's loop as a GIL-bound batch on another thread would


def _stall(seconds: float, threshold: float = 0.1) -> None:
    """One step of kafka-python's own network loop that takes ``seconds``: it logs its
    'Task … ran for …s' warning itself."""
    net = NetworkSelector(slow_task_threshold_secs=threshold)
    try:
        net.run(_busy, seconds)
    finally:
        net.close()


def test_short_kafka_loop_stalls_are_not_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    """kafka-python 3 warned 'Task … ran for 0.106s … likely a tight sync loop inside a
    coroutine' whenever the worker's main thread held the GIL for a batch: noise that blamed
    a loop that does not exist. Below 1 s it is dropped; the selector's other warnings stay."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    selector = logging.getLogger("kafka.net.selector")
    filters, kafka_level = selector.filters[:], logging.getLogger("kafka").level
    try:
        configure_logging("INFO", "console")
        configure_logging("INFO", "console")  # idempotent: one filter
        assert sum(isinstance(f, KafkaStallFilter) for f in selector.filters) == 1
        _stall(0.15)
        selector.warning("Task %s left RUNNING after step; demoting to UNSCHEDULED", "t")
    finally:
        root.handlers[:], root.level = handlers, level
        selector.filters[:] = filters
        logging.getLogger("kafka").setLevel(kafka_level)
    err = capsys.readouterr().err
    assert "ran for" not in err
    assert "left RUNNING" in err


def test_long_kafka_loop_stalls_stay_warnings() -> None:
    """A stall past ``warn_after`` delays heartbeats and fetches: kafka-python's line is kept
    as it wrote it."""
    records: list[logging.LogRecord] = []
    selector = logging.getLogger("kafka.net.selector")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    stall = KafkaStallFilter(warn_after=0.05)
    selector.addHandler(handler)
    selector.addFilter(stall)
    try:
        _stall(0.01, threshold=0.005)  # under warn_after: dropped
        _stall(0.08, threshold=0.005)  # over it: kept
    finally:
        selector.removeHandler(handler)
        selector.removeFilter(stall)
    stalls = [r for r in records if "ran for" in r.getMessage()]
    assert len(stalls) == 1 and stalls[0].levelno == logging.WARNING
    took = re.search(r"ran for (\d+\.\d+)s", stalls[0].getMessage())
    assert took is not None and float(took.group(1)) >= 0.05
