"""Routing incident state changes: Alertmanager v2, the ``driftline.alerts`` topic, a webhook.

The book writes every state change to its ``changes`` stream in the same transaction as the
incident (:mod:`driftline.alerts.book`). :meth:`Router.deliver` reads that stream with one
cursor per target, kept in Redis (``{prefix}:cursor``, field = target), and moves a target's
cursor only past what the target accepted, so delivery is at-least-once across restarts and a
dead target holds back only itself. Kafka messages carry ``change_id`` for consumers that
deduplicate.

An HTTP target's answer decides what happens to a change it did not accept: no answer (a
transport error), 5xx, 408 or 429 is transient, so the change waits for the next round (the
webhook first tries it again, up to ``webhook_attempts`` in all); a 400, 413, 415 or 422 is a
rejection of that payload, which sending it again cannot change, so it is logged, counted
(``outcome="rejected"``) and the cursor moves past it: dropped for that target, rather than
holding back everything after it for good. Any other answer — another 4xx (401, 403, 404: the
target's URL or credentials, which an operator fixes, after which the changes should still
arrive) or a redirect — is a failure (``outcome="error"``): the change waits for the next
round, not tried again at once.

Alertmanager identifies an alert by its label set. Each push sends the incident's *current*
state; when its labels change (severity escalated, root moved, acknowledged) the previous label
set is ended in the same push. Active incidents are re-sent by :meth:`Router.resend` every
``RESEND_INTERVAL_S``, well under Alertmanager's ``resolve_timeout`` (5 min by default), which
ends an alert that is not re-sent; a resolved incident is pushed once more with ``endsAt``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from driftline.alerts.book import FailureBook, IncidentNotFound
from driftline.alerts.changes import Change
from driftline.alerts.model import SEVERITY_ORDER, Incident, Status
from driftline.alerts.store import stream_id, text

log = logging.getLogger(__name__)

ALERTNAME = "DriftlineIncident"
# Grafana dashboards (deploy/grafana: uid and variables), as paths: the alert rules' dashboard
# annotations are the same, and a receiver's template puts Grafana's base URL before them
STATION_DASHBOARD = "/d/driftline-station"
FLEET_DASHBOARD = "/d/driftline-fleet"
RESEND_INTERVAL_S = 60.0  # < Alertmanager's default resolve_timeout of 5 min
HTTP_TIMEOUT_S = 5.0
KAFKA_TIMEOUT_S = 10.0
BATCH = 200
RETRY_LATER = frozenset({408, 429})  # 4xx that say "not now" (timeout, rate limit), not "never"
# 4xx that refuse the payload itself: malformed, too large, of a type or content not taken
PAYLOAD_REFUSED = frozenset({400, 413, 415, 422})
EXCERPT_CHARS = 200  # of a rejection's body in the log: enough for the reason, not a page
ACTIVE_STATUSES = (Status.open, Status.acknowledged)


class AlertMetrics:
    """``driftline_incidents_open{severity,status}``, ``driftline_incidents_held{severity}``,
    ``driftline_incidents_total{severity}``, ``driftline_incidents_paged_total{severity}``,
    ``driftline_alerts_pushes_total{target,outcome}`` (outcome ``ok``; ``error``: retried;
    ``rejected``: a 400, 413, 415 or 422, dropped for that target).

    A held incident (not paged yet) counts in ``held`` only: ``open`` is what the pager and
    the Prometheus rules on it see."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("driftline_incidents_open",
                          "Active incidents: status open (unacknowledged) or acknowledged",
                          ["severity", "status"], registry=registry)
        self.held = Gauge("driftline_incidents_held",
                          "Active incidents held: opened by the co-occurrence attribution, "
                          "not paged until it is stable behind them", ["severity"],
                          registry=registry)
        self.total = Counter("driftline_incidents_total", "Incidents opened", ["severity"],
                             registry=registry)
        self.paged = Counter("driftline_incidents_paged_total",
                             "Incidents paged: routed when opened, or released from hold",
                             ["severity"], registry=registry)
        self.pushes = Counter("driftline_alerts_pushes_total", "Deliveries to alert targets",
                              ["target", "outcome"], registry=registry)
        for sev in SEVERITY_ORDER:  # at 0 from the start: increase() sees the first incident
            self.total.labels(sev.value)
            self.paged.labels(sev.value)

    def observe(self, changes: Iterable[Change]) -> None:
        """Count the incidents opened by committed changes, and those paged (an incident
        opened and merged within one batch, or held and merged before it paged, never is)."""
        for c in changes:
            if c.action == "opened":
                self.total.labels(c.incident["severity"]).inc()
            if c.routed and c.action in ("opened", "paged"):
                self.paged.labels(c.incident["severity"]).inc()

    def set_open(self, incidents: Iterable[Incident]) -> None:
        """Active incidents by severity and status (``open``: nobody acknowledged it yet);
        held ones by severity apart."""
        counts = dict.fromkeys(((sev.value, st.value) for sev in SEVERITY_ORDER
                                for st in ACTIVE_STATUSES), 0)
        held = dict.fromkeys((sev.value for sev in SEVERITY_ORDER), 0)
        for inc in incidents:
            if inc.held:
                held[inc.severity.value] += 1
            else:
                counts[inc.severity.value, inc.status.value] += 1
        for (sev, st), n in counts.items():
            self.open.labels(sev, st).set(n)
        for sev, n in held.items():
            self.held.labels(sev).set(n)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _transient(exc: BaseException) -> bool:
    """Worth sending again: no answer, or an answer saying to try later (5xx, 408, 429)."""
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code in RETRY_LATER
    return isinstance(exc, httpx.TransportError)


def _rejection(exc: httpx.HTTPError) -> httpx.Response | None:
    """The response when the target refused the payload itself, for good
    (:data:`PAYLOAD_REFUSED`)."""
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in PAYLOAD_REFUSED:
        return exc.response
    return None


def _excerpt(resp: httpx.Response) -> str:
    return " ".join(resp.text[:EXCERPT_CHARS].split())


class Router:
    """Delivers the book's changes to the configured targets (see the module docstring)."""

    def __init__(self, book: FailureBook, metrics: AlertMetrics, *, public_url: str,
                 alertmanager_url: str | None = None, producer: Any | None = None,
                 producer_factory: Callable[[], Any] | None = None,
                 topic: str = "driftline.alerts", webhook_url: str | None = None,
                 webhook_attempts: int = 4, http: httpx.Client | None = None,
                 prefix: str = "dl:alerts", alert_labels: Mapping[str, str] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.book, self.r = book, book.r
        self.metrics = metrics
        self.public_url = public_url.rstrip("/")
        self.am_url = alertmanager_url.rstrip("/") if alertmanager_url else None
        # ``producer_factory``: the producer is made at the first send, and again after a
        # failed attempt, so that the book starts and pages with the broker down
        self.producer, self.producer_factory, self.topic = producer, producer_factory, topic
        self.webhook_url, self.webhook_attempts = webhook_url, webhook_attempts
        # DRIFTLINE_ALERT_LABELS (names checked by config: none of the book's own labels)
        self.alert_labels = dict(alert_labels or {})
        self.http = http or httpx.Client(timeout=HTTP_TIMEOUT_S)
        self.prefix = prefix
        self.clock = clock
        self.targets: dict[str, Callable[[list[tuple[str, dict[str, Any]]]], int]] = {}
        if self.am_url:
            self.targets["alertmanager"] = self._to_alertmanager
        if producer is not None or producer_factory is not None:
            self.targets["kafka"] = self._to_kafka
        if webhook_url:
            self.targets["webhook"] = self._to_webhook
        for target in self.targets:  # at 0 from the start: the first rejection is an increase
            for outcome in ("ok", "error", "rejected"):
                metrics.pushes.labels(target, outcome)
        self._start_new_targets()

    def link(self, incident_id: str) -> str:
        return f"{self.public_url}/api/v1/incidents/{incident_id}"

    def description(self, inc: Incident) -> str:
        """What on-call does with the alert: triage from the incident's link, then acknowledge
        it (which ends the page) and resolve it, through the API. A root slice whose cell
        falls back to a baseline that does not fit it is said first: the alarm may be a gap
        in the reference (the book's catalogue holds the cells; nothing is read for it)."""
        link = self.link(inc.id)
        resolve = (f"Resolve it with POST {link}/resolve and a root-cause category once the "
                   "cause is fixed.")
        if not inc.active:
            return f"Resolved; {link} keeps its evidence and timeline."
        root = inc.slices.get(inc.root.slice_id)
        found = self.book.catalog.misfit(inc.root, root.reference_id if root else None)
        gap = f"{found.sentence} " if found is not None else ""
        if inc.status == Status.acknowledged:
            return (f"{gap}Acknowledged, no longer paging; follow it at {link} "
                    f"({link}/evidence, {link}/exemplars). {resolve}")
        return (f"{gap}Triage at {link}: what drifted, where and since when ({link}/evidence, "
                f"{link}/exemplars). Then acknowledge it with POST {link}/acknowledge "
                "(operator token): that ends this alert and starts an acknowledged one, "
                f"which the shipped Alertmanager config does not page. {resolve}")

    # --- the change stream ---------------------------------------------------------------
    def _start_new_targets(self) -> None:
        """A target without a cursor (newly configured, or its cursor lost) starts at the end
        of the change stream: it is sent what changes from now on, not the book's whole
        history (up to ``CHANGES_MAXLEN`` old changes); Alertmanager learns the active
        incidents from :meth:`resend`. Done at construction, before this process ingests."""
        try:
            end = text(self.r.xinfo_stream(self.book.changes_key)["last-generated-id"])
        except redis.ResponseError:  # no change stream yet: from its first change
            end = "0-0"
        for target in self.targets:
            if self.r.hsetnx(f"{self.prefix}:cursor", target, end):
                log.info("alert target starts at the end of the change stream",
                         extra={"target": target, "cursor": end})

    def deliver(self) -> int:
        """Deliver up to ``BATCH`` pending changes to every target; return how many changes the
        targets are done with (accepted, or rejected for good). A backlog drains over
        successive calls, so it does not hold back the processor's other work (ingesting
        alarms, re-sending alerts). A target that fails in an unexpected way is logged and
        counted, and holds back only itself; Redis errors propagate (the processor retries
        the step)."""
        done = 0
        for target, send in self.targets.items():
            try:
                done += self._deliver_batch(target, send)
            except redis.RedisError:
                raise
            except Exception:  # noqa: BLE001 - one target's failure must not stop the others
                log.exception("alert delivery failed", extra={"target": target})
                self.metrics.pushes.labels(target, "error").inc()
        return done

    def _deliver_batch(self, target: str,
                       send: Callable[[list[tuple[str, dict[str, Any]]]], int]) -> int:
        cur = self.r.hget(f"{self.prefix}:cursor", target)
        rows = self.r.xrange(self.book.changes_key, f"({cur.decode()}" if cur else "-", "+",
                             count=BATCH)
        changes = [(i.decode(), json.loads(f[b"change"])) for i, f in rows]
        routed = [(cid, c) for cid, c in changes if c.get("routed")]
        sent = send(routed) if routed else 0
        # Past every unrouted change and every routed one the target accepted or rejected.
        failed = stream_id(routed[sent][0]) if sent < len(routed) else None
        passed = [cid for cid, _ in changes if failed is None or stream_id(cid) < failed]
        if passed:
            self.r.hset(f"{self.prefix}:cursor", target, passed[-1])
        return sent

    def _message(self, cid: str, change: dict[str, Any]) -> dict[str, Any]:
        """An alerts-topic or webhook message: the change, its id, the incident's link and, if
        configured, the alert labels (which tell deployments apart: their incident ids are
        each book's own sequence)."""
        labels = {"alert_labels": self.alert_labels} if self.alert_labels else {}
        return {**change, "change_id": cid, **labels,
                "incident": {**change["incident"], "link": self.link(change["incident_id"])}}

    def _to_kafka(self, routed: list[tuple[str, dict[str, Any]]]) -> int:
        try:  # with the broker down, send (no metadata) and flush raise KafkaTimeoutError
            if self.producer is None and self.producer_factory is not None:
                self.producer = self.producer_factory()
            producer: Any = self.producer
            futures = [producer.send(self.topic, key=c["incident_id"].encode(),
                                     value=json.dumps(self._message(cid, c)).encode())
                       for cid, c in routed]
            producer.flush(timeout=KAFKA_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - retried on the next round, from the cursor
            log.warning("kafka alert delivery failed", extra={"error": repr(exc)})
            self.metrics.pushes.labels("kafka", "error").inc()
            return 0
        ok = 0
        for fut in futures:
            try:
                fut.get(timeout=KAFKA_TIMEOUT_S)
            except Exception as exc:  # a KafkaError or a timeout: retried on the next round
                log.warning("kafka alert delivery failed", extra={"error": repr(exc)})
                self.metrics.pushes.labels("kafka", "error").inc()
                break
            self.metrics.pushes.labels("kafka", "ok").inc()
            ok += 1
        return ok

    def _to_webhook(self, routed: list[tuple[str, dict[str, Any]]]) -> int:
        """POST the changes in order; return how many, from the first, the webhook accepted or
        rejected (see the module docstring). Only transient failures are tried again: a
        rejection retried would fail each time and hold up the processor's step."""
        done = 0
        for cid, c in routed:
            try:
                for attempt in Retrying(
                        retry=retry_if_exception(_transient),
                        wait=wait_exponential(multiplier=0.5, max=4),
                        stop=stop_after_attempt(self.webhook_attempts), reraise=True):
                    with attempt:
                        resp = self.http.post(self.webhook_url or "", json=self._message(cid, c))
                        resp.raise_for_status()
            except httpx.HTTPError as exc:
                rejected = _rejection(exc)
                if rejected is None:
                    log.warning("webhook delivery failed",
                                extra={"error": repr(exc), "change_id": cid,
                                       "incident_id": c["incident_id"]})
                    self.metrics.pushes.labels("webhook", "error").inc()
                    break
                self._rejected("webhook", rejected, change_id=cid,
                               incident_id=c["incident_id"])
            else:
                self.metrics.pushes.labels("webhook", "ok").inc()
            done += 1
        return done

    def _rejected(self, target: str, resp: httpx.Response, **what: str) -> None:
        """Log and count a payload the target rejected for good: it is not sent again."""
        body = _excerpt(resp)
        log.warning("%s rejected %s with HTTP %d (%s): dropped for this target", target,
                    " ".join(f"{k}={v}" for k, v in what.items()), resp.status_code, body,
                    extra={"target": target, **what, "status": resp.status_code, "body": body})
        self.metrics.pushes.labels(target, "rejected").inc()

    def _to_alertmanager(self, routed: list[tuple[str, dict[str, Any]]]) -> int:
        ids = list(dict.fromkeys(c["incident_id"] for _, c in routed))
        incidents = []
        for iid in ids:
            try:
                incidents.append(self.book.get(iid))
            except IncidentNotFound:  # removed by retention since: nothing to show
                continue
        return len(routed) if self.push(incidents, changes=routed) else 0

    # --- Alertmanager --------------------------------------------------------------------
    def labels(self, inc: Incident) -> dict[str, str]:
        """The alert's identity in Alertmanager. ``status`` (open, acknowledged) is one of them,
        so an acknowledgement ends the open alert and starts an acknowledged one, which
        Alertmanager can route away from the pager (deploy/alertmanager/alertmanager.yml).
        The configured ``alert_labels`` (a ``deployment``) tell apart the alerts of
        deployments sharing an Alertmanager, whose incident ids and root slices can coincide;
        changing them ends the alerts pushed with the old ones at the next push."""
        status = inc.status if inc.active else (  # resolved: the label set it is ending
            Status.acknowledged if any(e.action == "acknowledged" for e in inc.timeline)
            else Status.open)
        return {**self.alert_labels, "alertname": ALERTNAME, "incident_id": inc.id,
                "severity": inc.severity.value, "status": status.value,
                "root_template": inc.root.template, **inc.root.dims}

    def alert(self, inc: Incident) -> dict[str, Any]:
        now = self.clock()
        starts = min(inc.created_at, now)
        onset = _iso(inc.onset) if inc.onset else "unknown"
        out: dict[str, Any] = {
            "labels": self.labels(inc),
            "annotations": {
                "summary": summary(inc),
                "description": self.description(inc), "onset": onset,
                "link": self.link(inc.id), "status": inc.status.value,
                "evidence": _evidence_line(inc), "dashboard": dashboard(inc)},
            "startsAt": _iso(starts), "generatorURL": self.link(inc.id)}
        if not inc.active:
            out["endsAt"] = _iso(max(inc.resolved_at or now, starts))
        return out

    def push(self, incidents: Sequence[Incident],
             changes: Sequence[tuple[str, dict[str, Any]]] = ()) -> bool:
        """POST the incidents' current alerts, ending label sets they no longer have. False
        when the push should be tried again; True when Alertmanager took it, or rejected it
        for good (logged, naming the ``changes`` pushed if any, and counted). A 400 still
        stores the valid alerts of the push (Alertmanager drops only the invalid ones), so
        the label sets are recorded as pushed either way."""
        if not self.am_url or not incidents:
            return True
        key = f"{self.prefix}:am_labels"
        previous = self.r.hmget(key, [i.id for i in incidents])
        alerts, ended = [], _iso(self.clock())
        for inc, prev in zip(incidents, previous, strict=True):
            alerts.append(self.alert(inc))
            if prev is not None and json.loads(prev) != self.labels(inc):
                alerts.append({"labels": json.loads(prev), "startsAt": _iso(inc.created_at),
                               "endsAt": ended})
        ids = [i.id for i in incidents]  # a re-send can hold thousands: name a few
        what = {"incidents": ",".join(ids[:10]) + (f",… ({len(ids)})" if ids[10:] else "")}
        if changes:
            what["changes"] = f"{changes[0][0]}..{changes[-1][0]}"
        try:
            resp = self.http.post(f"{self.am_url}/api/v2/alerts", json=alerts)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            rejected = _rejection(exc)
            if rejected is None:
                log.warning("alertmanager push failed", extra={"error": repr(exc), **what})
                self.metrics.pushes.labels("alertmanager", "error").inc()
                return False
            self._rejected("alertmanager", rejected, **what)
        else:
            self.metrics.pushes.labels("alertmanager", "ok").inc()
        live = {i.id: json.dumps(self.labels(i)) for i in incidents if i.active}
        if live:
            self.r.hset(key, mapping=live)
        gone = [i.id for i in incidents if not i.active]
        if gone:
            self.r.hdel(key, *gone)
        return True

    def resend(self) -> bool:
        """Re-push every active incident but the held ones, never paged (call every
        ``RESEND_INTERVAL_S``); update gauges."""
        active = self.book.active()
        self.metrics.set_open(active)
        return self.push([i for i in active if not i.held])

    def close(self) -> None:
        """Close the HTTP client and the producer (the router owns both)."""
        self.http.close()
        if self.producer is not None:
            self.producer.close(timeout=KAFKA_TIMEOUT_S)


def summary(inc: Incident) -> str:
    """What drifted, where and since when, in one line: ``critical drift at lot=L2609 since
    2026-11-16T06:32:05Z (ood_rate; 1 related slice)``."""
    since = f" since {_iso(inc.onset)}" if inc.onset else ""
    n = len(inc.related)
    return (f"{inc.severity.value} drift at {inc.root.slice_id}{since}"
            f" ({', '.join(sorted({f.detector for f in inc.detectors}))};"
            f" {n} related slice{'' if n == 1 else 's'})")


def dashboard(inc: Incident) -> str:
    """The Grafana dashboard of the incident's root slice: its station's (and shift's), or the
    fleet's for a root without a station. A path: see :data:`STATION_DASHBOARD`."""
    dims = inc.root.dims
    if "station" not in dims:
        return FLEET_DASHBOARD
    query = {f"var-{dim}": dims[dim] for dim in ("station", "shift") if dim in dims}
    return f"{STATION_DASHBOARD}?{urlencode(query)}"


def _evidence_line(inc: Incident) -> str:
    """One line an on-call engineer can read: the largest cluster shifts and the OOD rate."""
    parts = [f"cluster {c.cluster}: {c.p_ref:.1%} → {c.p_obs:.1%}"
             for c in inc.evidence.clusters[:2]]
    ood = inc.evidence.ood
    if ood is not None and ood.ratio is not None and ood.ratio >= 1.5:
        parts.append(f"OOD {ood.rate:.1%} ({ood.ratio:.1f}× reference)")
    return "; ".join(parts) or "see link"
