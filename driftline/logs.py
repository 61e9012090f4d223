"""Structured logs with the standard library: one JSON object per line, or console text."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def _utc(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed with ``extra=``: the slice, partition, offset or setting a line is
    about."""
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """Fields passed with ``extra=`` become keys, so logs can be filtered by slice or offset."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class ConsoleFormatter(logging.Formatter):
    """One readable line: UTC time, level, logger, message, then the ``extra=`` fields as
    ``key=value`` (a message such as ``alarm`` says little without its slice and detector)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = f"{_utc(record)} {record.levelname:<7} {record.name}: {record.message}"
        fields = " ".join(f"{k}={_value(v)}" for k, v in _fields(record).items())
        if fields:  # after the whole message (one of several lines too), before a traceback
            line = f"{line} {fields}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def _value(v: Any) -> str:
    """A field's value on one line: plain text as is, the rest (or text with spaces or
    quotes) as JSON."""
    if isinstance(v, str) and v and not any(c.isspace() or c in "\"'=" for c in v):
        return v
    return json.dumps(v, default=str, ensure_ascii=False)


class KafkaStallFilter(logging.Filter):
    """kafka-python 3's network loop warns when one of its steps took over 0.1 s of wall time
    ("Task … ran for 0.106s … likely a tight sync loop inside a coroutine. Other pollers will
    time out."). In a driftline worker that step waits for the GIL while the main thread
    embeds or checkpoints a batch, so the line came in loaded demo runs and blamed a loop
    that does not exist, for a delay that harms nothing: heartbeats go every third of the
    session timeout (``DRIFTLINE_KAFKA_SESSION_TIMEOUT_MS``, 20 s by default). Steps shorter
    than ``warn_after`` seconds are dropped (:func:`configure_logging` keeps the kafka loggers
    at WARNING or above, so a DEBUG line would be dropped too); longer stalls, which do hold
    up heartbeats and fetches, stay warnings as kafka-python wrote them."""

    _STEP = re.compile(r"^Task .* ran for (\d+(?:\.\d+)?)s \(>")

    def __init__(self, warn_after: float = 1.0) -> None:
        super().__init__()
        self.warn_after = warn_after

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str):
            return True
        step = self._STEP.match(record.msg)
        return step is None or float(step.group(1)) >= self.warn_after


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every driftline logger to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO ("HTTP Request: POST …/api/v2/alerts 200"): one line
    # per Alertmanager push and re-send, naming no incident. driftline logs the failures
    # itself, with the target, change and incident (driftline.alerts.routing).
    for noisy in ("kafka", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # group membership (joins, assignments, rebalances) is rare and what one reads first when
    # a worker owns nothing: keep kafka-python's coordinator at the service's level
    logging.getLogger("kafka.coordinator").setLevel(root.level)
    selector = logging.getLogger("kafka.net.selector")
    if not any(isinstance(f, KafkaStallFilter) for f in selector.filters):
        selector.addFilter(KafkaStallFilter())
