"""Routing's answer to an HTTP target's failures: a transient one (no answer, 5xx, 408, 429)
holds the target's cursor and is retried; a rejection (another 4xx) is logged, counted and
dropped for that target at once, instead of holding back every change after it.

The router runs here on an in-memory stand-in for the few Redis calls it makes; against a real
Redis it is tested in tests/integration/test_book.py."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import redis
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from driftline.alerts.book import FailureBook
from driftline.alerts.changes import change_json
from driftline.alerts.evidence import ClusterCatalog
from driftline.alerts.model import Incident, Status
from driftline.alerts.routing import AlertMetrics, Router
from driftline.alerts.store import stream_id
from driftline.service.app import API_PREFIX
from driftline.service.routes.incidents import router as incidents_api
from tests.unit.alerts.synthetic import opened_apart

NOW = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
CHANGES = "t:book:changes"
CURSOR = "t:alerts:cursor"


class MiniRedis:
    """The router's Redis calls on one change stream and a few hashes, in memory."""

    def __init__(self) -> None:
        self.stream: list[tuple[str, bytes]] = []
        self.hashes: defaultdict[str, dict[str, bytes]] = defaultdict(dict)

    def xadd(self, change: str) -> str:
        sid = f"{len(self.stream) + 1}-0"
        self.stream.append((sid, change.encode()))
        return sid

    def xinfo_stream(self, key: str) -> dict[str, bytes]:
        if not self.stream:
            raise redis.ResponseError("no such key")
        return {"last-generated-id": self.stream[-1][0].encode()}

    def xrange(self, key: str, lo: str, hi: str, count: int
               ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        after = stream_id(lo[1:]) if lo.startswith("(") else (0, 0)  # "-": from the first
        return [(sid.encode(), {b"change": raw}) for sid, raw in self.stream
                if stream_id(sid) > after][:count]

    def hsetnx(self, key: str, field: str, value: str) -> int:
        if field in self.hashes[key]:
            return 0
        self.hashes[key][field] = value.encode()
        return 1

    def hget(self, key: str, field: str) -> bytes | None:
        return self.hashes[key].get(field)

    def hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        return [self.hashes[key].get(f) for f in fields]

    def hset(self, key: str, field: str | None = None, value: str | None = None,
             mapping: dict[str, str] | None = None) -> None:
        items = dict(mapping or {}) | ({field: value} if field and value is not None else {})
        self.hashes[key].update({k: v.encode() for k, v in items.items()})

    def hdel(self, key: str, *fields: str) -> None:
        for f in fields:
            self.hashes[key].pop(f, None)


def opened(*slices: str) -> tuple[dict[str, Incident], list[str]]:
    """An incident per slice, each opened (and routed) by its alarm, and those changes as the
    book stores them on its change stream."""
    g, _, _ = opened_apart(*slices, now=NOW)
    assert all(c.routed for c in g.changes) and len(g.changes) == len(slices)
    return g.incidents, [change_json(c) for c in g.changes]


def router(db: MiniRedis, incidents: dict[str, Incident], registry: CollectorRegistry,
           handler: Any, catalog: ClusterCatalog | None = None, **kw: Any) -> Router:
    book = SimpleNamespace(r=db, changes_key=CHANGES, get=incidents.__getitem__,
                           catalog=catalog or ClusterCatalog())
    return Router(cast(FailureBook, book), AlertMetrics(registry),
                  public_url="http://driftline.test", prefix="t:alerts",
                  http=httpx.Client(transport=httpx.MockTransport(handler)), **kw)


def pushes(registry: CollectorRegistry, target: str, outcome: str) -> float | None:
    return registry.get_sample_value("driftline_alerts_pushes_total",
                                     {"target": target, "outcome": outcome})


def test_a_change_the_webhook_rejects_is_dropped_at_once_and_the_next_delivered(
        caplog: pytest.LogCaptureFixture) -> None:
    incidents, changes = opened("station=press-3", "station=press-1")
    posted: list[str] = []
    answer = "field 'incident.evidence':\n  too large " + "x" * 999

    def hook(request: httpx.Request) -> httpx.Response:
        msg = json.loads(request.content)
        posted.append(msg["change_id"])
        if msg["incident_id"] == "DL-000001":
            return httpx.Response(422, text=answer)
        return httpx.Response(200)

    db, registry = MiniRedis(), CollectorRegistry()
    hooked = router(db, incidents, registry, hook, webhook_url="http://hooks.test/driftline",
                    webhook_attempts=3)
    first, second = (db.xadd(c) for c in changes)
    with caplog.at_level(logging.WARNING, logger="driftline.alerts.routing"):
        assert hooked.deliver() == 2
    assert posted == [first, second]  # the rejected change was sent once, not retried
    assert db.hget(CURSOR, "webhook") == second.encode()
    assert (pushes(registry, "webhook", "rejected"), pushes(registry, "webhook", "ok"),
            pushes(registry, "webhook", "error")) == (1, 1, 0)
    (rec,) = caplog.records
    got = vars(rec)  # the fields passed with extra=
    assert rec.levelno == logging.WARNING
    assert (got["target"], got["change_id"], got["incident_id"], got["status"]) == (
        "webhook", first, "DL-000001", 422)
    assert got["body"].startswith("field 'incident.evidence': too large xxx")
    assert len(got["body"]) < len(answer) / 2 and "\n" not in got["body"]  # an excerpt
    for part in ("webhook", first, "DL-000001", "422", "too large"):
        assert part in rec.getMessage()

    assert hooked.deliver() == 0 and posted == [first, second]  # dropped for good
    hooked.close()


@pytest.mark.parametrize("failure", [503, 500, 408, 429, "connect"])
def test_a_transient_webhook_failure_is_retried_and_holds_the_cursor(
        failure: int | str, caplog: pytest.LogCaptureFixture) -> None:
    incidents, (change,) = opened("station=press-3")
    down, posted = [True], []

    def hook(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content)["change_id"])
        if not down[0]:
            return httpx.Response(200)
        if failure == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(int(failure))

    db, registry = MiniRedis(), CollectorRegistry()
    hooked = router(db, incidents, registry, hook, webhook_url="http://hooks.test/driftline",
                    webhook_attempts=2)
    cid = db.xadd(change)
    with caplog.at_level(logging.WARNING, logger="driftline.alerts.routing"):
        assert hooked.deliver() == 0 and posted == [cid, cid]
    # the warning says which change and incident wait (httpx's own lines are not shown)
    (rec,) = caplog.records
    assert (rec.getMessage(), vars(rec)["change_id"], vars(rec)["incident_id"]) == (
        "webhook delivery failed", cid, "DL-000001")
    assert db.hget(CURSOR, "webhook") == b"0-0"
    assert (pushes(registry, "webhook", "error"), pushes(registry, "webhook", "rejected")) == (
        1, 0)
    down[0] = False
    assert hooked.deliver() == 1 and posted == [cid, cid, cid]
    assert db.hget(CURSOR, "webhook") == cid.encode()
    hooked.close()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_webhook_s_wrong_url_or_credentials_hold_its_changes_until_fixed(status: int) -> None:
    """Not the payload's fault: once the operator fixes the URL or token, every change held
    since arrives (dropping them would lose all of them); counted as errors, which page."""
    incidents, (change,) = opened("station=press-3")
    answer, posted = [status], []

    def hook(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content)["change_id"])
        return httpx.Response(answer[0])

    db, registry = MiniRedis(), CollectorRegistry()
    hooked = router(db, incidents, registry, hook, webhook_url="http://hooks.test/driftline",
                    webhook_attempts=3)
    cid = db.xadd(change)
    assert hooked.deliver() == 0 and posted == [cid]  # not tried again at once
    assert db.hget(CURSOR, "webhook") == b"0-0"
    assert (pushes(registry, "webhook", "error"), pushes(registry, "webhook", "rejected")) == (
        1, 0)
    answer[0] = 200
    assert hooked.deliver() == 1 and db.hget(CURSOR, "webhook") == cid.encode()
    hooked.close()


def test_a_push_alertmanager_rejects_moves_its_cursor_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """Alertmanager answers 400 when some alerts of a push are invalid (it stores the rest):
    pushing the same changes again cannot help, so its cursor moves on; a 503 holds it."""
    incidents, changes = opened("station=press-3", "station=press-1")
    status, pushed = [503], []

    def am(request: httpx.Request) -> httpx.Response:
        pushed.append({a["labels"]["incident_id"] for a in json.loads(request.content)})
        return httpx.Response(status[0], text="bad alert: invalid label value")

    db, registry = MiniRedis(), CollectorRegistry()
    paging = router(db, incidents, registry, am, alertmanager_url="http://am.test")
    first = db.xadd(changes[0])
    with caplog.at_level(logging.WARNING, logger="driftline.alerts.routing"):
        assert paging.deliver() == 0 and db.hget(CURSOR, "alertmanager") == b"0-0"
    assert pushes(registry, "alertmanager", "error") == 1
    (rec,) = caplog.records  # a failure names what waits, as a rejection does
    got = vars(rec)
    assert (rec.getMessage(), got["incidents"], got["changes"]) == (
        "alertmanager push failed", "DL-000001", f"{first}..{first}")
    assert "503" in got["error"]

    status[0] = 400
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="driftline.alerts.routing"):
        assert paging.deliver() == 1
    assert db.hget(CURSOR, "alertmanager") == first.encode()
    assert pushes(registry, "alertmanager", "rejected") == 1
    (rec,) = caplog.records
    got = vars(rec)
    assert (got["target"], got["incidents"], got["changes"], got["status"], got["body"]) == (
        "alertmanager", "DL-000001", f"{first}..{first}", 400, "bad alert: invalid label value")

    status[0] = 200
    second = db.xadd(changes[1])
    assert paging.deliver() == 1 and pushed[-1] == {"DL-000002"}
    assert db.hget(CURSOR, "alertmanager") == second.encode()
    assert pushes(registry, "alertmanager", "ok") == 1
    paging.close()


def test_every_target_exports_its_outcomes_at_zero_from_the_start() -> None:
    # DriftlineAlertsRejected reads increase(): a series born at 1 would hide the first one.
    registry = CollectorRegistry()
    db = MiniRedis()
    hooked = router(db, {}, registry, lambda request: httpx.Response(200),
                    webhook_url="http://hooks.test/driftline")
    assert [pushes(registry, "webhook", o) for o in ("ok", "error", "rejected")] == [0, 0, 0]
    assert pushes(registry, "alertmanager", "rejected") is None  # not configured: no series
    hooked.close()


def test_the_pushed_alert_says_what_to_do_and_links_its_station_dashboard() -> None:
    """On-call reads the annotations: what to do (triage at the link, acknowledge through the
    API route that exists, which ends the page; resolve), and the root station's dashboard
    (a Grafana path, as the alert rules' are), the fleet's for a root without a station."""
    incidents, (change,) = opened("station=press 3/a|shift=night")
    sent: list[dict[str, Any]] = []

    def am(request: httpx.Request) -> httpx.Response:
        sent.extend(json.loads(request.content))
        return httpx.Response(200)

    db, registry = MiniRedis(), CollectorRegistry()
    paging = router(db, incidents, registry, am, alertmanager_url="http://am.test")
    db.xadd(change)
    assert paging.deliver() == 1
    (pushed,) = sent
    station = pushed["annotations"]
    (lot_incident,) = opened("lot=L7")[0].values()
    lot = paging.alert(lot_incident)["annotations"]
    link = "http://driftline.test/api/v1/incidents/DL-000001"
    assert station["link"] == link
    assert f"Triage at {link}:" in station["description"]
    assert f"POST {link}/acknowledge (operator token)" in station["description"]
    assert f"POST {link}/resolve and a root-cause category" in station["description"]
    assert station["dashboard"] == "/d/driftline-station?var-station=press+3%2Fa&var-shift=night"
    assert lot["dashboard"] == "/d/driftline-fleet"
    assert "/acknowledge (operator token)" in lot["description"]
    # what drifted, where and since when (onset, UTC), and how many related slices
    assert station["summary"] == ("warning drift at station=press 3/a|shift=night since "
                                  "2023-11-14T22:13:20Z (cluster_mix; 0 related slices)")
    related = [lot_incident.root.model_copy(update={"slice_id": f"station=s{k}"})
               for k in range(2)]
    for n, noun in ((1, "1 related slice)"), (2, "2 related slices)")):
        assert paging.alert(lot_incident.model_copy(update={"related": related[:n]}))[
            "annotations"]["summary"].endswith(noun)
    unknown = paging.alert(lot_incident.model_copy(update={"onset": None}))["annotations"]
    assert unknown["summary"].startswith(f"{lot_incident.severity.value} drift at lot=L7 (")
    assert unknown["onset"] == "unknown"

    # the routes the description names are the API's
    posts = {API_PREFIX + r.path for r in incidents_api.routes if "POST" in r.methods}
    for action in ("acknowledge", "resolve"):
        assert f"{API_PREFIX}/incidents/{{incident_id}}/{action}" in posts

    # acknowledged: no longer paging, what is left to do
    inc = incidents["DL-000001"].model_copy(update={"status": Status.acknowledged})
    alert = paging.alert(inc)
    assert alert["annotations"]["description"].startswith("Acknowledged, no longer paging")
    assert "/acknowledge" not in alert["annotations"]["description"]
    paging.close()


def test_an_alert_whose_root_cell_does_not_fit_its_fallback_says_it_may_be_a_reference_gap(
        ) -> None:
    """The book's catalogue (of the reference it started with) names the cells; the alert of
    a root slice in one says so, unless the alarm was raised on another reference."""
    catalog = ClusterCatalog(reference_id="ref-1", misfits={
        "station=press-2": {"n": 120, "judged_against": "global", "p_value": 3e-9},
        "station=press-1|shift=night": {"n": 80, "judged_against": "station=press-1",
                                        "p_value": 2e-5}})
    incidents = {sid: inc for sid in ("station=press-2", "station=press-1|shift=night",
                                      "shift=night", "station=press-3")
                 for inc in opened(sid)[0].values()}
    paging = router(MiniRedis(), incidents, CollectorRegistry(), lambda r: httpx.Response(200),
                    catalog=catalog)
    said = {sid: paging.alert(i)["annotations"]["description"] for sid, i in incidents.items()}
    assert said["station=press-2"].startswith(
        "station=press-2 has no baseline of its own and its 120 reference events do not fit "
        "global's, which it is judged against: this alarm may be a gap in the reference, not "
        "drift. Triage at ")
    assert said["station=press-1|shift=night"].startswith(
        "station=press-1|shift=night has no baseline of its own and its 80 reference events "
        "do not fit station=press-1's")
    for sid in ("shift=night", "station=press-3"):
        assert said[sid].startswith("Triage at ")
    inc = incidents["station=press-2"]
    acked = paging.alert(inc.model_copy(update={"status": Status.acknowledged}))
    assert "may be a gap in the reference" in acked["annotations"]["description"]
    root = inc.slices[inc.root.slice_id]
    other = inc.model_copy(update={"slices": {
        inc.root.slice_id: root.model_copy(update={"reference_id": "ref-0"})}})
    assert paging.alert(other)["annotations"]["description"].startswith("Triage at ")
    paging.close()


def test_a_webhook_failure_stops_the_batch_so_no_later_change_overtakes_it() -> None:
    """The cursor is one position: a later change accepted past a failed one would move it past
    the failed one too, and that change would never be sent. The batch stops at the failure."""
    incidents, changes = opened("station=press-3", "station=press-1")
    down, posted = [True], []

    def hook(request: httpx.Request) -> httpx.Response:
        msg = json.loads(request.content)
        posted.append(msg["change_id"])
        return httpx.Response(503 if down[0] and msg["incident_id"] == "DL-000001" else 200)

    db, registry = MiniRedis(), CollectorRegistry()
    hooked = router(db, incidents, registry, hook, webhook_url="http://hooks.test/driftline",
                    webhook_attempts=1)
    first, second = (db.xadd(c) for c in changes)
    assert hooked.deliver() == 0 and posted == [first]  # the second waits behind the first
    assert db.hget(CURSOR, "webhook") == b"0-0"
    assert (pushes(registry, "webhook", "error"), pushes(registry, "webhook", "ok")) == (1, 0)
    down[0] = False
    assert hooked.deliver() == 2 and posted == [first, first, second]  # in order
    assert db.hget(CURSOR, "webhook") == second.encode()
    hooked.close()


class Future:
    """A record's send result: ``get`` raises ``error`` if the broker failed it."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


class Producer:
    """Sends succeed but for the change ids in ``failing`` (their futures raise)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.messages: list[dict[str, Any]] = []
        self.failing: set[str] = set()

    def send(self, topic: str, key: bytes, value: bytes) -> Future:
        self.messages.append(json.loads(value))
        cid = self.messages[-1]["change_id"]
        self.sent.append(cid)
        return Future(KafkaTimeoutError("batch expired") if cid in self.failing else None)

    def flush(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


def test_a_kafka_record_failing_part_way_through_a_batch_holds_the_cursor_before_it() -> None:
    """The producer sends the batch at once; the cursor moves past the records acked from the
    first, up to the first failed one: the records after it are sent again with it, never
    skipped (consumers deduplicate by ``change_id``)."""
    incidents, changes = opened("station=press-3", "station=press-1", "lot=L7")
    db, registry, producer = MiniRedis(), CollectorRegistry(), Producer()
    topic = router(db, incidents, registry, lambda request: httpx.Response(200),
                   producer=producer)
    first, second, third = (db.xadd(c) for c in changes)
    producer.failing = {second}
    assert topic.deliver() == 1 and producer.sent == [first, second, third]
    assert db.hget(CURSOR, "kafka") == first.encode()
    assert (pushes(registry, "kafka", "ok"), pushes(registry, "kafka", "error")) == (1, 1)
    producer.failing = set()
    assert topic.deliver() == 2 and producer.sent[3:] == [second, third]
    assert db.hget(CURSOR, "kafka") == third.encode()
    topic.close()


def am_router(incidents: dict[str, Incident], clock: datetime,
              active: list[Incident] | None = None, db: MiniRedis | None = None, **kw: Any
              ) -> tuple[Router, list[dict[str, Any]], CollectorRegistry]:
    """A router to Alertmanager whose book's active incidents are ``active``, at ``clock``;
    the alerts it pushes are collected."""
    sent: list[dict[str, Any]] = []

    def am(request: httpx.Request) -> httpx.Response:
        sent.extend(json.loads(request.content))
        return httpx.Response(200)

    registry = CollectorRegistry()
    book = SimpleNamespace(r=db or MiniRedis(), changes_key=CHANGES,
                           get=incidents.__getitem__, active=lambda: list(active or []),
                           catalog=ClusterCatalog())
    paging = Router(cast(FailureBook, book), AlertMetrics(registry),
                    public_url="http://driftline.test", prefix="t:alerts",
                    alertmanager_url="http://am.test", clock=lambda: clock,
                    http=httpx.Client(transport=httpx.MockTransport(am)), **kw)
    return paging, sent, registry


def test_resend_re_pushes_the_active_incidents_but_not_the_held_ones() -> None:
    """A held incident never paged: re-sending it would page it before the plan is stable
    behind it. It still counts in the held gauge."""
    incidents, _ = opened("station=press-3", "station=press-1")
    paged, held = incidents["DL-000001"], incidents["DL-000002"].model_copy(
        update={"held": True, "held_since": NOW})
    paging, sent, registry = am_router(incidents, NOW, active=[paged, held])
    assert paging.resend()
    assert [a["labels"]["incident_id"] for a in sent] == ["DL-000001"]
    assert registry.get_sample_value("driftline_incidents_held",
                                     {"severity": held.severity.value}) == 1
    paging.close()


def test_an_alert_starts_at_its_creation_or_now_and_a_resolved_one_ends_at_its_resolution(
        ) -> None:
    """``startsAt`` is the incident's creation, or now when the book's clock is ahead of the
    router's (Alertmanager refuses no alert for it, but shows it starting in the future);
    ``endsAt``, sent only once resolved, is its resolution, never before its ``startsAt``,
    and now when the resolution time is missing."""
    incidents, _ = opened("station=press-3")
    inc = incidents["DL-000001"]
    created, hour = inc.created_at, timedelta(hours=1)
    paging, _, _ = am_router(incidents, created + 2 * hour)

    def alert(at: datetime, **update: Any) -> dict[str, Any]:
        paging.clock = lambda: at
        return paging.alert(inc.model_copy(update=update))

    live = alert(created + 2 * hour)
    assert live["startsAt"] == "2026-01-05T08:00:00Z" and "endsAt" not in live
    assert alert(created - hour)["startsAt"] == "2026-01-05T07:00:00Z"  # clock behind
    resolved = {"status": Status.resolved}
    done = alert(created + 2 * hour, **resolved, resolved_at=created + hour)
    assert (done["startsAt"], done["endsAt"]) == ("2026-01-05T08:00:00Z", "2026-01-05T09:00:00Z")
    assert alert(created + 2 * hour, **resolved)["endsAt"] == "2026-01-05T10:00:00Z"
    # resolved before it started by the router's clock: ends as it starts, not before
    early = alert(created + 2 * hour, **resolved, resolved_at=created - hour)
    assert early["endsAt"] == early["startsAt"] == "2026-01-05T08:00:00Z"
    skewed = alert(created - 2 * hour, **resolved, resolved_at=created - 3 * hour)
    assert skewed["endsAt"] == skewed["startsAt"] == "2026-01-05T06:00:00Z"
    paging.close()


@pytest.mark.parametrize("alert_labels", [{"deployment": "plant-7", "site": "lyon"}, {}])
def test_every_target_gets_the_configured_alert_labels(alert_labels: dict[str, str]) -> None:
    """Two deployments sharing an Alertmanager number their incidents alike (DL-000001 in
    each): the configured labels (DRIFTLINE_ALERT_LABELS) tell their alerts apart, and the
    alerts-topic and webhook messages carry them too. Unset, every payload is as before."""
    incidents, (change,) = opened("station=press-3|shift=night")
    alerts: list[dict[str, Any]] = []
    hooked: list[dict[str, Any]] = []

    def targets(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        (alerts.extend if request.url.host == "am.test" else hooked.append)(body)
        return httpx.Response(200)

    db, producer = MiniRedis(), Producer()
    routing = router(db, incidents, CollectorRegistry(), targets,
                     alertmanager_url="http://am.test", producer=producer,
                     webhook_url="http://hooks.test/driftline", alert_labels=alert_labels)
    db.xadd(change)
    assert routing.deliver() == 3
    (alert,) = alerts
    assert alert["labels"] == {**alert_labels, "alertname": "DriftlineIncident",
                               "incident_id": "DL-000001", "severity": "warning",
                               "status": "open", "root_template": "station+shift",
                               "station": "press-3", "shift": "night"}
    for message in (*hooked, *producer.messages):
        assert message.get("alert_labels") == (alert_labels or None)
        assert message["incident_id"] == "DL-000001"
    assert len(hooked) == len(producer.messages) == 1
    routing.close()


def test_setting_alert_labels_ends_the_alerts_pushed_without_them() -> None:
    """Alertmanager knows an alert by its label set: once a deployment label is configured, the
    next push ends the incident's alert pushed without it, or that alert would page on its own
    until resolve_timeout, beside the labelled one."""
    incidents, _ = opened("station=press-3")
    inc, db = incidents["DL-000001"], MiniRedis()
    before, sent_before, _ = am_router(incidents, NOW, active=[inc], db=db)
    assert before.resend()
    (old,) = sent_before
    assert "deployment" not in old["labels"]
    later = NOW + timedelta(minutes=1)
    after, sent, _ = am_router(incidents, later, active=[inc], db=db,
                               alert_labels={"deployment": "plant-7"})
    assert after.resend()
    live, ended = sent
    assert live["labels"] == {**old["labels"], "deployment": "plant-7"}
    assert "endsAt" not in live
    assert ended["labels"] == old["labels"] and ended["endsAt"] == "2026-01-05T08:01:00Z"
    assert after.resend() and sent[2:] == [live]  # ended once
    before.close()
    after.close()
