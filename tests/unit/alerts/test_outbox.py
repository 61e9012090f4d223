"""An unusable outbox entry is skipped, and the log names it, so it can be read back."""

from __future__ import annotations

import logging
from typing import Any, cast
from unittest.mock import MagicMock

import pytest
import redis

from driftline.alerts.processor import IncidentProcessor


class Outbox:
    """The processor's Redis reads: one batch of outbox entries, an empty summary."""

    def __init__(self, rows: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self.rows = rows

    def xinfo_stream(self, key: str) -> None:
        raise redis.ResponseError("no such key")

    def xread(self, *args: object, **kwargs: object) -> list[Any]:
        return [(b"dl:detect:outbox", self.rows)]

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {}


def test_an_unusable_entry_is_logged_with_its_id_and_passed_on_as_none(
        caplog: pytest.LogCaptureFixture) -> None:
    rows = [(b"1794810725000-0", {b"alarm": b'{"kind": "alarm", "slice_id": "station=s1"}'}),
            (b"1794810725000-1", {b"other": b"x"})]
    book = MagicMock(**{"cursor.return_value": None, "ingest.return_value": [],
                        "reattribute.return_value": [], "enforce_retention.return_value": 0})
    processor = IncidentProcessor(cast(redis.Redis, Outbox(rows)), book, block_ms=0)
    with caplog.at_level(logging.ERROR, logger="driftline.alerts.processor"):
        assert processor.step(block_ms=0) == 2
    assert book.ingest.call_args.args[0] == [("1794810725000-0", None),
                                             ("1794810725000-1", None)]
    logged = [(r.getMessage(), vars(r)["id"]) for r in caplog.records]
    assert logged == [("unusable outbox entry skipped", "1794810725000-0"),
                      ("unusable outbox entry skipped", "1794810725000-1")]
    assert "slice_id/template" in vars(caplog.records[0])["error"]  # and why
