"""The failure book's Redis layout and write protocol (:class:`BookStore`).

Redis layout (``prefix`` defaults to ``dl:book``; every JSON record has ``schema_version``)::

    {prefix}:rev                   int     bumped by every write; each write WATCHes it
    {prefix}:seq                   int     last incident number (ids DL-000001, …)
    {prefix}:inc:{id}              string  incident JSON (:class:`~driftline.alerts.model.Incident`)
    {prefix}:active                set     ids of open and acknowledged incidents
    {prefix}:idx:all               zset    id -> detection time (event time, POSIX s)
    {prefix}:idx:status:{s}        zset    the same, per status; also :severity:{s},
    {prefix}:idx:{dim}:{value}     zset    and per station/shift/lot of the root or related
    {prefix}:resolved              zset    id -> resolution time (wall clock), for retention
    {prefix}:sig                   hash    id -> JSON recurrence signature of resolved incidents
                                           (not of those merged into another), with
                                           the reference its root alarm was raised on
    {prefix}:reset_pending         hash    slice_id TAB detector -> id, detectors whose reset
                                           was requested (a bare slice_id: all its detectors)
    {prefix}:changes               stream  state changes to route (field ``change``: JSON)
    {prefix}:cursor                string  last ``dl:detect:outbox`` id applied
    {prefix}:applied               int     outbox entries read so far (to detect trimming)

Every write is one ``MULTI``/``EXEC`` under ``WATCH {prefix}:rev``: the processor's incident
writes and its outbox cursor commit together (exactly-once effect of the outbox), concurrent
writers (API and processor, or two processors) retry instead of overwriting each other, and the
change stream gets the changes of exactly the writes that happened (a transactional outbox, so
routing survives restarts). Durability is the server's AOF.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from tenacity import Retrying, retry, retry_if_exception_type, stop_after_delay, wait_exponential

from driftline.alerts.changes import Change, change_json
from driftline.alerts.evidence import root_reference
from driftline.alerts.model import SCHEMA_VERSION, Incident

T = TypeVar("T")
CHANGES_MAXLEN = 100_000
CONTROL_MAXLEN = 10_000
# A Redis restart with AOF replay takes seconds; API callers should not wait much longer.
REDIS_WAIT_S = 15
_RETRYABLE = retry_if_exception_type((RedisConnectionError, RedisTimeoutError))
retry_redis = retry(retry=_RETRYABLE, wait=wait_exponential(multiplier=0.1, max=2),
                    stop=stop_after_delay(REDIS_WAIT_S), reraise=True)


def _retrying() -> Retrying:
    return Retrying(retry=_RETRYABLE, wait=wait_exponential(multiplier=0.1, max=2),
                    stop=stop_after_delay(REDIS_WAIT_S), reraise=True)


def stream_id(sid: str) -> tuple[int, int]:
    """A Redis stream id ``ms-seq`` as a comparable tuple."""
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


def text(v: bytes | str) -> str:
    """A Redis reply as text (clients are built without ``decode_responses``)."""
    return v.decode() if isinstance(v, bytes) else v


def now_utc() -> datetime:
    return datetime.now(UTC)


class Batch:
    """Reads done under WATCH, writes staged for one MULTI/EXEC."""

    def __init__(self, book: BookStore, pipe: Pipeline) -> None:
        self.book = book
        self.pipe: Any = pipe  # redis-py types results as sync-or-async unions
        self.loaded: dict[str, set[str]] = {}
        self.saves: dict[str, Incident] = {}
        self.changes: list[Change] = []
        self.ops: list[Callable[[Pipeline], object]] = []
        self.seq: int | None = None

    def load(self, ids: Sequence[str]) -> list[Incident]:
        raws = self.pipe.mget([self.book.k("inc", i) for i in ids]) if ids else []
        out = [Incident.model_validate_json(r) for r in raws if r is not None]
        for inc in out:
            self.loaded[inc.id] = self.book.index_keys(inc)
        return out

    def new_id(self) -> str:
        if self.seq is None:
            self.seq = int(self.pipe.get(self.book.k("seq")) or 0)
        self.seq += 1
        return f"DL-{self.seq:06d}"

    def flush(self, pipe: Pipeline) -> None:
        b = self.book
        for inc in self.saves.values():
            score = inc.detected_at.timestamp()
            keys = b.index_keys(inc)
            pipe.set(b.k("inc", inc.id), inc.model_dump_json())
            for key in self.loaded.get(inc.id, set()) - keys:
                pipe.zrem(key, inc.id)
            for key in keys:
                pipe.zadd(key, {inc.id: score})
            if inc.active:
                pipe.sadd(b.k("active"), inc.id)
                continue
            pipe.srem(b.k("active"), inc.id)
            pipe.zadd(b.k("resolved"), {inc.id: (inc.resolved_at or b.clock()).timestamp()})
            if inc.merged_into is not None:  # part of the incident it went into, not a past one
                continue
            pipe.hset(b.k("sig"), inc.id, json.dumps({
                "schema_version": SCHEMA_VERSION, "template": inc.root.template,
                "root": inc.root.slice_id, "signature": inc.evidence.signature,
                "reference_id": root_reference(inc),
                "category": inc.resolution.category.value if inc.resolution else None}))
        if self.seq is not None:
            pipe.set(b.k("seq"), self.seq)
        for c in self.changes:
            pipe.xadd(b.changes_key, {"change": change_json(c)}, maxlen=CHANGES_MAXLEN,
                      approximate=True)
        for op in self.ops:
            op(pipe)


class BookStore:
    """Keys, indexes and the transaction runner (see the module docstring)."""

    def __init__(self, client: redis.Redis, prefix: str, clock: Callable[[], datetime]) -> None:
        self.r: Any = client  # redis-py types results as sync-or-async unions
        self.prefix = prefix
        self.clock = clock

    def k(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    @property
    def changes_key(self) -> str:
        return self.k("changes")

    def index_keys(self, inc: Incident) -> set[str]:
        keys = {self.k("idx", "all"), self.k("idx", "status", inc.status.value),
                self.k("idx", "severity", inc.severity.value)}
        for dim, values in inc.dims().items():
            keys.update(self.k("idx", dim, v) for v in values)
        return keys

    def transact(self, fn: Callable[[Batch], T]) -> T:
        """Run ``fn`` (reads under WATCH, writes staged on the batch) and commit atomically;
        retried on a concurrent write and, for ``REDIS_WAIT_S``, on a lost connection."""
        result: T = _retrying()(self._transact_once, fn)
        return result

    def _transact_once(self, fn: Callable[[Batch], T]) -> T:
        while True:
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.k("rev"))
                    batch = Batch(self, pipe)
                    result = fn(batch)
                    pipe.multi()
                    batch.flush(pipe)
                    pipe.incr(self.k("rev"))
                    pipe.execute()
                    return result
                except WatchError:
                    continue
