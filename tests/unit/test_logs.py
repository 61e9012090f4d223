"""Both log formats carry what a line is about (its ``extra=`` fields) and UTC times."""

from __future__ import annotations

import json
import logging
import re

import pytest

from driftline.logs import ConsoleFormatter, JsonFormatter, configure_logging


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
