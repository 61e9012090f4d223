"""The failure book: incidents from alarms, their lifecycle, list pages, retention.

Storage and the write protocol are in :mod:`driftline.alerts.store` (one ``MULTI``/``EXEC``
per write, with the outbox cursor and the change stream); the alarm → incident logic is the
pure :mod:`driftline.alerts.grouping`; list filters and cursors are in
:mod:`driftline.alerts.pages`.
"""

from __future__ import annotations

import builtins
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, Unpack, overload

import redis
from redis.client import Pipeline

from driftline.alerts.attribution import SliceStatus
from driftline.alerts.changes import Change, log_changes, record_change
from driftline.alerts.evidence import ClusterCatalog
from driftline.alerts.grouping import BookPolicy, Grouper, pending_key
from driftline.alerts.labelset import label_set_jsonl
from driftline.alerts.model import Incident, Resolution, RootCause, Status
from driftline.alerts.pages import IncidentRow, Page, Query, read_page
from driftline.alerts.store import (
    CONTROL_MAXLEN,
    Batch,
    BookStore,
    now_utc,
    retry_redis,
    stream_id,
    text,
)

log = logging.getLogger(__name__)

# How long a committed on-call step's token is kept: longer than any retry of its call.
OP_TOKEN_TTL_S = 600


class IncidentNotFound(KeyError):
    """No incident with that id (never existed, or removed by retention)."""


class InvalidTransition(ValueError):
    """The lifecycle does not allow that step (e.g. acknowledging a resolved incident)."""


class _Unappliable(Exception):
    """Grouping failed on outbox entry ``entry_id`` (``None``: on the batch as a whole)."""

    def __init__(self, entry_id: str | None) -> None:
        super().__init__(entry_id)
        self.entry_id = entry_id


@dataclass(frozen=True)
class Retention:
    """Resolved incidents kept: at most ``max_resolved``, none older than ``max_age_s``."""

    max_resolved: int = 10_000
    max_age_s: float = 90 * 86400.0
    # A reset on-call asked for is done within a checkpoint or two of a running detect stage;
    # until then the slice's alarm updates belong to the resolved incident. Requests are
    # forgotten this long after their resolve (or with their incident): a slice that never
    # alarms again would otherwise keep its entry forever.
    reset_pending_s: float = 7 * 86400.0


def _live_firings(inc: Incident) -> dict[str, builtins.list[str]]:
    """The detectors, per slice, whose alarm ``inc`` still holds: what resolving it resets.
    Only those: a slice whose alarm moved to another incident (its next episode), or another
    detector of the slice that another incident holds, goes on — a reset forgets the open
    alarm without a clear, and that incident would wait for one that never comes."""
    live: dict[str, builtins.list[str]] = {}
    for f in inc.detectors:
        if f.active and f.detector not in live.setdefault(f.slice_id, []):
            live[f.slice_id].append(f.detector)
    return {sid: sorted(dets) for sid, dets in sorted(live.items()) if dets}


class FailureBook(BookStore):
    """Incidents in Redis (layout and write protocol: :mod:`driftline.alerts.store`)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "dl:book",
                 policy: BookPolicy | None = None, retention: Retention | None = None,
                 catalog: ClusterCatalog | None = None,
                 control_key: str = "dl:detect:control",
                 clock: Callable[[], datetime] = now_utc) -> None:
        super().__init__(client, prefix, clock)
        self.policy = policy or BookPolicy()
        self.retention = retention or Retention()
        self.catalog = catalog or ClusterCatalog()
        self.control_key = control_key

    # --- reads ---------------------------------------------------------------------------
    @retry_redis
    def get(self, incident_id: str) -> Incident:
        raw = self.r.get(self.k("inc", incident_id))
        if raw is None:
            raise IncidentNotFound(incident_id)
        return Incident.model_validate_json(raw)

    @retry_redis
    def active(self) -> list[Incident]:
        ids = sorted(m.decode() for m in self.r.smembers(self.k("active")))
        raws = self.r.mget([self.k("inc", i) for i in ids]) if ids else []
        return [Incident.model_validate_json(r) for r in raws if r is not None]

    @retry_redis
    def applied(self) -> int:
        """How many outbox entries the book has read (applied or skipped as unusable)."""
        return int(self.r.get(self.k("applied")) or 0)

    @retry_redis
    def cursor(self) -> str | None:
        raw = self.r.get(self.k("cursor"))
        return None if raw is None else str(raw.decode())

    @overload
    def list(self, *, light: Literal[False] = False, **query: Unpack[Query]
             ) -> Page[Incident]: ...

    @overload
    def list(self, *, light: Literal[True], **query: Unpack[Query]) -> Page[IncidentRow]: ...

    @retry_redis
    def list(self, *, light: bool = False, **query: Unpack[Query]
             ) -> Page[Incident] | Page[IncidentRow]:
        """Newest detection first, filtered (:class:`~driftline.alerts.pages.Query`); follow
        ``next_cursor`` for more. ``light`` rows (:class:`IncidentRow`) hold what a list shows
        and parse about three times faster than whole incidents."""
        if light:
            return read_page(self.r, self.k, IncidentRow.model_validate_json, query)
        return read_page(self.r, self.k, Incident.model_validate_json, query)

    def label_set_jsonl(self, incident_id: str,
                        embeddings: Mapping[str, Sequence[float]] | None = None,
                        radius: float = 0.3) -> str:
        """The smallest covering sample set of the incident's exemplars, as JSON Lines."""
        return label_set_jsonl(self.get(incident_id), embeddings, radius)

    # --- on-call actions -----------------------------------------------------------------
    def _mutate(self, incident_id: str, step: Callable[[Incident, datetime, Batch], Change]
                ) -> Incident:
        """Apply one on-call step exactly once. The transaction also writes a one-off token:
        when it is retried because its reply was lost (a Redis restart, a timeout right after
        ``EXEC``), the token shows it committed, so a note is not added twice and an
        acknowledgement is not refused as a conflict with itself."""
        token = self.k("op", uuid.uuid4().hex)

        def fn(batch: Batch) -> Incident:
            found = batch.load([incident_id])
            if not found:
                raise IncidentNotFound(incident_id)
            inc = found[0]
            if batch.pipe.exists(token):  # an earlier attempt of this call committed
                return inc
            batch.changes.append(step(inc, self.clock(), batch))
            batch.saves[inc.id] = inc
            batch.ops.append(lambda p: p.set(token, 1, ex=OP_TOKEN_TTL_S))
            return inc
        return self.transact(fn)

    def acknowledge(self, incident_id: str, who: str, note: str | None = None) -> Incident:
        def step(inc: Incident, at: datetime, batch: Batch) -> Change:
            if inc.status is not Status.open:
                raise InvalidTransition(f"{inc.id} is {inc.status.value}, not open")
            inc.status = Status.acknowledged
            return record_change(inc, "acknowledged", who=who, at=at, note=note,
                                 max_timeline=self.policy.max_timeline)
        return self._mutate(incident_id, step)

    def resolve(self, incident_id: str, category: RootCause | str, note: str | None,
                who: str) -> Incident:
        """Resolve with a root cause (also classifies an auto-resolved or merged incident),
        and ask the detect stage to reset the incident's slices."""
        cat = RootCause(category)
        made: builtins.list[Change] = []  # the committed attempt's change, logged after it

        def step(inc: Incident, at: datetime, batch: Batch) -> Change:
            if inc.resolution is not None:
                raise InvalidTransition(f"{inc.id} was already resolved as "
                                        f"{inc.resolution.category.value}")
            was_active = inc.active
            inc.status, inc.resolution = Status.resolved, Resolution(
                category=cat, note=note, who=who, at=at)
            inc.resolved_at = inc.resolved_at or at
            live = _live_firings(inc) if was_active else {}
            if live:
                batch.ops.append(lambda p: [p.xadd(
                    self.control_key, {"reset": sid, "detectors": ",".join(dets),
                                       "incident": inc.id, "who": who},
                    maxlen=CONTROL_MAXLEN, approximate=True) for sid, dets in live.items()])
                batch.ops.append(lambda p: p.hset(self.k("reset_pending"), mapping={
                    pending_key(sid, d): inc.id for sid, dets in live.items() for d in dets}))
            made[:] = [record_change(inc, "resolved" if was_active else "classified", who=who,
                                     at=at, note=f"{cat.value}: {note}" if note else cat.value,
                                     max_timeline=self.policy.max_timeline)]
            return made[0]
        resolved = self._mutate(incident_id, step)
        log_changes(made)
        return resolved

    def annotate(self, incident_id: str, note: str, who: str) -> Incident:
        def step(inc: Incident, at: datetime, batch: Batch) -> Change:
            return record_change(inc, "annotated", who=who, at=at, note=note, routed=False,
                                 max_timeline=self.policy.max_timeline)
        return self._mutate(incident_id, step)

    # --- the processor's side ------------------------------------------------------------
    def ingest(self, entries: Sequence[tuple[str, Mapping[str, Any] | None]],
               summary: Mapping[str, SliceStatus]) -> builtins.list[Change]:
        """Apply outbox entries ``(stream id, message or None if unreadable)`` after the
        stored cursor, and move the cursor to the last one, in one transaction.

        An entry that makes the grouping fail (a bug or a message from another version) is
        skipped, logged with its id, and the batch applied again without it, so one entry
        cannot stop the book: the failed transaction wrote nothing, and the grouper's state is
        built afresh. When the failure comes at the end of the batch, the batch is cut to its
        first usable entry to find the one to blame."""
        todo = builtins.list(entries)
        while True:
            try:
                return self.transact(partial(self._ingest, entries=todo, summary=summary))
            except _Unappliable as bad:
                if bad.entry_id is None:  # narrow down: up to the first usable entry
                    first = next(n for n, (_, m) in enumerate(todo) if m is not None)
                    todo = todo[:first + 1]
                    continue
                log.error("outbox entry skipped: the book cannot apply it",
                          extra={"id": bad.entry_id, "error": repr(bad.__cause__)})
                todo = [(eid, None if eid == bad.entry_id else m) for eid, m in todo]

    def _ingest(self, batch: Batch, *, entries: Sequence[tuple[str, Mapping[str, Any] | None]],
                summary: Mapping[str, SliceStatus]) -> builtins.list[Change]:
        raw = batch.pipe.get(self.k("cursor"))
        cur = stream_id(raw.decode()) if raw is not None else (-1, -1)
        fresh = [(eid, m) for eid, m in entries if stream_id(eid) > cur]
        if not fresh:
            return []
        g = self._grouper(batch, summary)
        for eid, msg in fresh:
            if msg is not None:
                try:
                    g.apply(msg)
                except redis.RedisError:
                    raise
                except Exception as exc:
                    raise _Unappliable(eid) from exc
        try:
            g.finish()
        except redis.RedisError:
            raise
        except Exception as exc:
            usable = [eid for eid, m in fresh if m is not None]
            if not usable:  # the book's own state, not an entry: the processor logs it
                raise
            raise _Unappliable(usable[0] if len(usable) == 1 else None) from exc
        self._stage(batch, g)
        last = fresh[-1][0]
        batch.ops.append(lambda p: p.set(self.k("cursor"), last))
        batch.ops.append(lambda p: p.incrby(self.k("applied"), len(fresh)))
        return g.changes

    def reattribute(self, summary: Mapping[str, SliceStatus]) -> builtins.list[Change]:
        """Attribute the active incidents again with a fresh slice summary (re-rooting)."""
        def fn(batch: Batch) -> builtins.list[Change]:
            g = self._grouper(batch, summary)
            g.reattribute()
            self._stage(batch, g)
            return g.changes
        return self.transact(fn)

    def _grouper(self, batch: Batch, summary: Mapping[str, SliceStatus]) -> Grouper:
        ids = sorted(m.decode() for m in batch.pipe.smembers(self.k("active")))
        pending = [k.decode() for k in batch.pipe.hkeys(self.k("reset_pending"))]
        sigs: dict[str, dict[str, Any]] = {}

        def signatures() -> Mapping[str, dict[str, Any]]:
            if not sigs:
                raw = batch.pipe.hgetall(self.k("sig"))
                sigs.update({k.decode(): json.loads(v) for k, v in raw.items()})
            return sigs
        return Grouper(batch.load(ids), summary, now=self.clock(), new_id=batch.new_id,
                       signatures=signatures, policy=self.policy, catalog=self.catalog,
                       reset_pending=pending)

    def _stage(self, batch: Batch, g: Grouper) -> None:
        batch.saves.update({i: g.incidents[i] for i in g.dirty})
        batch.changes.extend(g.changes)
        if g.reset_done:
            done = sorted(g.reset_done)
            batch.ops.append(lambda p: p.hdel(self.k("reset_pending"), *done))

    # --- retention -----------------------------------------------------------------------
    def enforce_retention(self) -> int:
        """Delete resolved incidents beyond the count or age limit; return how many."""
        def fn(batch: Batch) -> int:
            pipe, key = batch.pipe, self.k("resolved")
            cutoff = (self.clock() - timedelta(seconds=self.retention.max_age_s)).timestamp()
            doomed = {m.decode() for m in pipe.zrangebyscore(key, "-inf", cutoff)}
            excess = int(pipe.zcard(key)) - self.retention.max_resolved
            if excess > 0:
                doomed.update(m.decode() for m in pipe.zrange(key, 0, excess - 1))
            victims = batch.load(sorted(doomed))
            ids = sorted(doomed)
            keys = {i.id: sorted(batch.loaded[i.id]) for i in victims}

            def delete(p: Pipeline) -> None:
                for iid in ids:
                    p.delete(self.k("inc", iid))
                    p.zrem(key, iid)
                    p.hdel(self.k("sig"), iid)
                    for k in keys.get(iid, []):
                        p.zrem(k, iid)
            if ids:
                batch.ops.append(delete)
            self._forget_resets(batch, doomed)
            return len(ids)
        return self.transact(fn)

    def _forget_resets(self, batch: Batch, doomed: set[str]) -> None:
        """Drop the reset requests of incidents resolved over ``reset_pending_s`` ago, gone, or
        being deleted (``doomed``). Each request holds its incident's id; the resolve that made
        it also scored the incident in ``resolved`` with its resolution time."""
        pipe, key = batch.pipe, self.k("reset_pending")
        pending = {text(s): text(i) for s, i in pipe.hgetall(key).items()}
        if not pending:
            return
        ids = sorted(set(pending.values()))
        resolved = dict(zip(ids, pipe.zmscore(self.k("resolved"), ids), strict=True))
        cutoff = (self.clock() - timedelta(seconds=self.retention.reset_pending_s)).timestamp()
        stale = sorted(s for s, i in pending.items()
                       if i in doomed or (at := resolved[i]) is None or at < cutoff)
        if stale:
            batch.ops.append(lambda p: p.hdel(key, *stale))
            log.info("reset requests forgotten", extra={"count": len(stale)})
