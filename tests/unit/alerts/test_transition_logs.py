"""The failure book logs each incident transition once: opened (and where it paged, or held),
paged, escalated, re-rooted, split, merged, resolved — with the incident id, severity, root
slice, detectors and onset as a UTC date-time, so on-call finds an incident in the logs."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast
from unittest.mock import MagicMock

import pytest
import redis

from driftline.alerts.book import FailureBook
from driftline.alerts.changes import LOGGED_ACTIONS, log_changes
from driftline.alerts.model import RootCause, Status, iso
from driftline.alerts.processor import IncidentProcessor
from driftline.alerts.routing import Router
from tests.unit.alerts.synthetic import opened_apart
from tests.unit.alerts.test_replay_demo import COOCCURRENCE_DATA, replay

NOW = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
LOGGER = "driftline.alerts.changes"


def test_a_demo_replay_logs_each_transition_once_with_its_incident(
        caplog: pytest.LogCaptureFixture) -> None:
    incidents, changes = replay(20, COOCCURRENCE_DATA[0])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        log_changes(changes, ("alertmanager", "kafka"))
    logged = [c for c in changes if c.action in LOGGED_ACTIONS]
    # one line per transition, none per alarm update, related slice joined or note
    assert len(caplog.records) == len(logged) < len(changes)
    assert {c.action for c in logged} >= {"opened", "paged", "merged", "rerooted"}
    for rec, c in zip(caplog.records, logged, strict=True):
        got = vars(rec)
        assert rec.levelno == logging.INFO
        assert rec.getMessage() == f"incident {c.incident_id} {c.action}"
        assert (got["incident_id"], got["action"], got["severity"], got["root"]) == (
            c.incident_id, c.action, c.incident["severity"], c.incident["root"]["slice_id"])
        page = c.action in ("opened", "paged")
        assert got.get("paged_to") == ("alertmanager,kafka" if page and c.routed else None)
        held = page and not c.routed and c.incident["held"]
        assert got.get("held") is (True if held else None)
        assert ("not_paged" in got) is (page and not c.routed and not held)
    merged = [vars(r) for r in caplog.records if r.action == "merged"]
    assert all(m["note"].startswith("into DL-") for m in merged)
    # the haze at surf-1: its incident's lines name the station, detectors and onset (UTC)
    surf = next(i for i in incidents.values()
                if i.merged_into is None and i.root.slice_id == "station=surf-1")
    lines = [vars(r) for r in caplog.records if r.incident_id == surf.id]
    assert lines and lines[-1]["station"] == "surf-1" and lines[-1]["template"] == "station"
    assert lines[-1]["onset"] == iso(surf.onset) and lines[-1]["onset"].endswith("Z")
    assert set(lines[-1]["detectors"].split(",")) == {f.detector for f in surf.detectors}


def test_an_incident_opened_by_an_alarm_logs_its_page_and_its_onset_in_utc(
        caplog: pytest.LogCaptureFixture) -> None:
    g, _, _ = opened_apart("station=press-3|shift=night", now=NOW)
    (c,) = g.changes
    with caplog.at_level(logging.INFO, logger=LOGGER):
        log_changes(g.changes, ())
    (rec,) = caplog.records
    got = vars(rec)
    assert {k: got[k] for k in ("incident_id", "action", "root", "template", "station",
                                "shift", "detectors", "onset", "paged_to")} == {
        "incident_id": "DL-000001", "action": "opened", "root": "station=press-3|shift=night",
        "template": "station+shift", "station": "press-3", "shift": "night",
        "detectors": "cluster_mix", "onset": "2023-11-14T22:13:20Z",
        "paged_to": "none (no alert target configured)"}
    assert "lot" not in got


def _processor(book: Any, targets: tuple[str, ...]) -> IncidentProcessor:
    class Outbox:
        def xinfo_stream(self, key: str) -> None:
            raise redis.ResponseError("no such key")

        def xread(self, *args: object, **kwargs: object) -> list[Any]:
            return [(b"dl:detect:outbox", [(b"5-0", {b"alarm": b"{}"})])]

        def hgetall(self, key: str) -> dict[bytes, bytes]:
            return {}

    router = SimpleNamespace(targets=dict.fromkeys(targets), metrics=None,
                             deliver=lambda: 0, resend=lambda: True)
    return IncidentProcessor(cast(redis.Redis, Outbox()), book, router=cast(Router, router),
                             block_ms=0)


def test_an_incident_opened_and_merged_in_one_batch_says_it_did_not_page(
        caplog: pytest.LogCaptureFixture) -> None:
    """Not 'held': the grouper unroutes the changes of an incident that lived one batch."""
    incidents, changes = replay(20, COOCCURRENCE_DATA[0])
    transient = [c for c in changes if c.action == "opened" and not c.routed
                 and not c.incident["held"]]
    assert transient
    with caplog.at_level(logging.INFO, logger=LOGGER):
        log_changes(transient[:1], ("alertmanager",))
    (rec,) = caplog.records
    assert vars(rec)["not_paged"] == "merged within the batch that opened it"
    assert "held" not in vars(rec) and "paged_to" not in vars(rec)
    assert incidents[transient[0].incident_id].merged_into


def test_the_processor_logs_what_the_book_committed_and_where_it_pages(
        caplog: pytest.LogCaptureFixture) -> None:
    g, _, _ = opened_apart("station=press-1", now=NOW)
    book = MagicMock(**{"cursor.return_value": None, "ingest.return_value": g.changes,
                        "reattribute.return_value": [], "enforce_retention.return_value": 0})
    processor = _processor(book, ("alertmanager", "kafka", "webhook"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert processor.step(block_ms=0) == 1
    (rec,) = [r for r in caplog.records if r.name == LOGGER]
    assert (rec.getMessage(), vars(rec)["paged_to"]) == (
        "incident DL-000001 opened", "alertmanager,kafka,webhook")


def test_an_on_call_resolve_is_logged_once_it_committed(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    g, _, _ = opened_apart("lot=L7", now=NOW)
    (inc,) = g.incidents.values()
    batch = SimpleNamespace(ops=[])

    def committed(self: FailureBook, incident_id: str, step: Any) -> Any:
        step(inc, NOW, batch)  # as _mutate does, without Redis
        return inc
    monkeypatch.setattr(FailureBook, "_mutate", committed)
    book = FailureBook(cast(redis.Redis, MagicMock()))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        book.resolve(inc.id, RootCause.supplier_lot, "lot L7 recalled", "alice")
    assert inc.status is Status.resolved
    (rec,) = caplog.records
    got = vars(rec)
    assert (rec.getMessage(), got["who"], got["lot"], got["note"]) == (
        "incident DL-000001 resolved", "alice", "L7", "supplier_lot: lot L7 recalled")
