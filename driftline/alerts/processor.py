"""The incident processor: detect-stage outbox → failure book → alert routing.

One step (:meth:`IncidentProcessor.step`):

1. read the book's cursor and up to ``batch_size`` outbox entries after it (``XREAD``, which
   blocks up to ``block_ms`` when there are none);
2. read the detect stage's slice summary and apply the entries in **one** transaction that
   also moves the cursor (:meth:`FailureBook.ingest`): a crash before it applies nothing, a
   crash after it re-reads nothing, and a second processor's conflicting transaction retries;
3. log the committed transitions (:func:`~driftline.alerts.changes.log_changes`: opened,
   paged and where to, re-rooted, merged, resolved) and deliver the changes
   (:meth:`Router.deliver`, at-least-once per target);
4. every ``reattribute_interval_s`` attribute the active incidents again with a fresh summary
   (re-rooting on clean sibling data, which arrives as summaries, not alarms); every
   ``resend_interval_s`` re-send active alerts; every ``retention_interval_s`` apply retention.

Run one processor per book: a second one is safe (the transaction serialises them) but
delivers changes twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.book import FailureBook
from driftline.alerts.changes import log_changes
from driftline.alerts.routing import RESEND_INTERVAL_S, AlertMetrics, Router
from driftline.alerts.store import text

log = logging.getLogger(__name__)

# Clean sibling data shows up within seconds in the summary; re-rooting need not be faster.
REATTRIBUTE_INTERVAL_S = 5.0
# Retention is a sweep over resolved incidents: a few times an hour is plenty.
RETENTION_INTERVAL_S = 300.0
_REQUIRED = {"alarm": ("detector", "statistic", "threshold", "time", "dims", "evidence"),
             "update": ("detector", "statistic", "threshold", "time", "dims", "evidence"),
             "clear": ("detector", "time")}
_TYPES: dict[str, tuple[type, ...]] = {
    "detector": (str,), "statistic": (int, float), "threshold": (int, float),
    "time": (int, float), "dims": (dict,), "evidence": (dict,), "argmax": (dict,),
    "slice_n": (int,)}


def parse_outbox(fields: Mapping[bytes, bytes], entry_id: str | None = None
                 ) -> dict[str, Any] | None:
    """An outbox entry's ``alarm`` JSON, or ``None`` if it is unusable (logged with the
    entry's stream id, ``entry_id``, to find it with ``XRANGE``)."""
    try:
        msg = json.loads(fields[b"alarm"])
        need = _REQUIRED[msg["kind"]]
        if not isinstance(msg.get("slice_id"), str) or not isinstance(msg.get("template"), str):
            raise KeyError("slice_id/template")
        missing = [f for f in need if msg.get(f) is None]
        if missing:
            raise KeyError(", ".join(missing))
        wrong = [f for f, types in _TYPES.items()
                 if msg.get(f) is not None and (not isinstance(msg[f], types)
                                                or isinstance(msg[f], bool) and bool not in types)]
        if wrong:
            raise TypeError(f"wrong type: {', '.join(wrong)}")
        return dict(msg)
    except (KeyError, TypeError, ValueError) as exc:
        log.error("unusable outbox entry skipped", extra={"id": entry_id, "error": repr(exc)})
        return None


def read_summary(client: Any, key: str = "dl:detect:summary") -> dict[str, SliceStatus]:
    """The detect stage's per-slice summaries (``HGETALL``: bounded by the live slices)."""
    out = {}
    for sid, raw in client.hgetall(key).items():
        try:
            out[sid.decode()] = SliceStatus.from_summary(sid.decode(), json.loads(raw))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class IncidentProcessor:
    """Applies the outbox to the book and routes changes; see the module docstring."""

    def __init__(self, client: redis.Redis, book: FailureBook, *,
                 router: Router | None = None, metrics: AlertMetrics | None = None,
                 outbox_key: str = "dl:detect:outbox", summary_key: str = "dl:detect:summary",
                 batch_size: int = 500, block_ms: int = 1000,
                 reattribute_interval_s: float = REATTRIBUTE_INTERVAL_S,
                 resend_interval_s: float = RESEND_INTERVAL_S,
                 retention_interval_s: float = RETENTION_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.r: Any = client
        self.book = book
        self.router = router
        self.metrics = metrics or (router.metrics if router else None)
        self.outbox_key, self.summary_key = outbox_key, summary_key
        self.batch_size, self.block_ms = batch_size, block_ms
        self.intervals = {"reattribute": reattribute_interval_s,
                          "resend": resend_interval_s, "retention": retention_interval_s}
        self.clock = clock
        self.last: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.beat = time.monotonic()  # last turn of run()'s loop (see Service.liveness)
        self.check_trimmed()

    def check_trimmed(self) -> int:
        """Outbox entries trimmed before the book read them (alarms lost; logged).

        The book counts the entries it has read; entries not yet read are the ones added
        minus those. If fewer than that remain in the stream, the detect stage's ``MAXLEN``
        trimmed some before we read them."""
        try:
            info = self.r.xinfo_stream(self.outbox_key)
        except redis.ResponseError:  # no outbox yet
            return 0
        lost = int(info["entries-added"]) - self.book.applied() - int(info["length"])
        if lost > 0:
            log.error("outbox trimmed before the book read it: alarms were lost",
                      extra={"lost": lost, "cursor": self.book.cursor()})
        return max(lost, 0)

    def step(self, block_ms: int | None = None) -> int:
        """Steps 1–4 of the module docstring; returns the number of outbox entries read."""
        cur = self.book.cursor() or "0-0"
        block = self.block_ms if block_ms is None else block_ms
        resp = self.r.xread({self.outbox_key: cur}, count=self.batch_size,
                            block=block if block > 0 else None)
        entries = [(text(eid), parse_outbox(fields, text(eid)))
                   for _, rows in (resp or []) for eid, fields in rows]
        targets = tuple(self.router.targets) if self.router is not None else ()
        if entries:
            changes = self.book.ingest(entries, read_summary(self.r, self.summary_key))
            log_changes(changes, targets)
            if self.metrics is not None:
                self.metrics.observe(changes)
        if self._due("reattribute"):
            changes = self.book.reattribute(read_summary(self.r, self.summary_key))
            log_changes(changes, targets)
            if self.metrics is not None:
                self.metrics.observe(changes)  # splits open, held incidents page
            if changes:
                log.info("incidents re-attributed", extra={"changes": len(changes)})
        if self.router is not None:
            self.router.deliver()
            if self._due("resend"):
                self.router.resend()
        if self._due("retention"):
            self.check_trimmed()
            removed = self.book.enforce_retention()
            if removed:
                log.info("resolved incidents removed by retention", extra={"count": removed})
        return len(entries)

    def _due(self, what: str) -> bool:
        now = self.clock()
        if now - self.last.get(what, -float("inf")) >= self.intervals[what]:
            self.last[what] = now
            return True
        return False

    def run(self) -> None:
        """Step until :meth:`stop`; a Redis outage or any other failure of a step is logged
        and retried, never fatal (the thread dying would stop Alertmanager re-sends, and the
        pages would resolve themselves while the drift goes on)."""
        try:
            while not self.stop_event.is_set():
                self.beat = time.monotonic()  # liveness: the loop turns
                try:
                    self.step()
                except redis.RedisError as exc:
                    log.warning("incident processor step failed", extra={"error": repr(exc)})
                    self.stop_event.wait(1.0)
                except Exception:  # noqa: BLE001 - a bug must not stop paging: log, retry
                    log.exception("incident processor step failed unexpectedly; retrying")
                    self.stop_event.wait(5.0)
        finally:
            if self.router is not None:
                self.router.close()

    def stop(self) -> None:
        self.stop_event.set()
