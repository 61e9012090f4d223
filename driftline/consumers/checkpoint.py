"""Detect-stage checkpoints in Redis: slice state, applied source offsets and input offsets,
written in one transaction, fenced against a worker that lost its partition.

Redis layout (``prefix`` defaults to ``dl:detect``)::

    {prefix}:offsets             hash  input partition -> next slice-update offset to read
    {prefix}:state:{partition}   hash  slice_id -> record {"state": …, "applied": {src_p: offset}}
                                       (:func:`encode_record`: JSON header + raw arrays)
    {prefix}:epoch:{partition}   int   bumped by each worker that takes the partition
    {prefix}:outbox              stream of alarms, written with the state that raised them
    {prefix}:summary             hash  slice_id -> JSON summary (n, ratios, open detectors)
                                       (a retired slice's fields in ``state:{partition}`` and
                                       ``summary`` are deleted by the commit that retires it)
    {prefix}:control             stream of {"reset": slice_id} from the failure book (on-call
                                 resolved an incident: start the slice's detectors afresh)
    {prefix}:control_seen        hash  input partition -> last control entry applied

State records are :func:`driftline.core.snapshot.pack` bytes — the snapshot's numpy arrays
(CUSUM statistics and onsets, count buckets) as raw little-endian bytes behind a small JSON
header — about a quarter of the JSON float lists they replace and cheaper to write;
:func:`decode_record` reads them, and still reads the JSON records of earlier versions.

The epoch is the fence: a worker remembers the epoch it got when it claimed a partition and a
checkpoint succeeds only while every epoch it writes under is unchanged (``WATCH``), so a worker
that was rebalanced out and has not noticed yet cannot overwrite its successor's state.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import redis
from pydantic_core import PydanticSerializationError, to_json
from redis._parsers.base import BaseParser
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    WatchError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from tenacity import RetryCallState, retry, retry_if_exception_type, wait_exponential

from driftline.core.snapshot import is_packed, pack, unpack

log = logging.getLogger(__name__)

# How long a call retries an unreachable Redis unless its object says otherwise (``wait_s``):
# a restart with AOF replay takes seconds. The stages set a few seconds and retry at the next
# turn of their loops instead (see detect_stage).
REDIS_WAIT_S = 60
OUTBOX_MAXLEN = 100_000



class ResetRequest(NamedTuple):
    """One entry of the control stream: on-call resolved an incident, so the detect stage
    resets its slice's detectors."""

    entry_id: str
    slice_id: str
    detectors: list[str] | None  # None: all (requests written before they were named)
    incident: str | None = None  # who asked, and for which incident (written since 2026-11-25)
    who: str | None = None


class CannotPersistError(ResponseError):
    """``MISCONF``: Redis cannot persist (a full disk, a failed snapshot or AOF write) and
    refuses writes until it can. redis-py raises a bare ``ResponseError`` for it; registering
    the prefix makes it an exception class of its own, so that it reads as an outage."""


BaseParser.EXCEPTION_CLASSES.setdefault("MISCONF", CannotPersistError)

# What an outage looks like: a refused or dropped connection, a timeout, a server still loading
# (BusyLoadingError is a ConnectionError), a failover's read-only replica or one whose master is
# down, a full memory, or a server that cannot write to its disk.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError,
                MasterDownError, CannotPersistError)

# A deadline (monotonic) for the calls made inside ``CheckpointStore.waiting_at_most``, in this
# thread (or task).
_deadline: ContextVar[float | None] = ContextVar("redis_deadline", default=None)


def _wait_over(state: RetryCallState) -> bool:
    """Stop before a retry would start past the wait: ``REDIS_WAIT_S`` or the ``wait_s`` of the
    object whose method is retried (:class:`CheckpointStore`, the embed stage) since the call
    began, or the deadline of :meth:`CheckpointStore.waiting_at_most`. Each call makes one
    attempt at least, bounded by the client's socket timeouts (:func:`store_client`)."""
    wait_s = getattr(state.args[0], "wait_s", REDIS_WAIT_S) if state.args else REDIS_WAIT_S
    if (state.seconds_since_start or 0.0) + state.upcoming_sleep >= wait_s:
        return True
    deadline = _deadline.get()
    return deadline is not None and time.monotonic() + state.upcoming_sleep >= deadline


retry_redis = retry(
    retry=retry_if_exception_type(REDIS_ERRORS),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=_wait_over,
    reraise=True,
)


def store_client(url: str, socket_timeout_s: float = 5.0,
                 connect_timeout_s: float = 1.0) -> redis.Redis:
    """A Redis client for the stages, which retry with :data:`retry_redis` for a bounded wait:
    socket timeouts turn a Redis that stops answering into the error a restart gives (not a
    call that hangs: one attempt takes at most ``socket_timeout_s``), and redis-py's own retries
    are off — they take ~8 s per call against a refused connection."""
    return redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                socket_connect_timeout=min(connect_timeout_s, socket_timeout_s),
                                retry=Retry(NoBackoff(), 0))


def encode_record(record: dict[str, Any]) -> bytes:
    """A slice's checkpoint record ``{"state": snapshot, "applied": …}`` as stored."""
    return pack(record)


def encode_summary(summary: dict[str, Any]) -> bytes:
    """A slice's summary as stored: JSON, written by pydantic-core (a few times faster than the
    stdlib, for every dirty slice each checkpoint; compact, UTF-8), or by the stdlib for what
    UTF-8 cannot carry (lone surrogates in a slice's dims)."""
    try:
        return to_json(summary)
    except PydanticSerializationError:
        return json.dumps(summary).encode()


def decode_record(raw: bytes) -> dict[str, Any]:
    """A stored record back (snapshot arrays as numpy arrays); JSON records of earlier
    versions too."""
    doc: dict[str, Any] = unpack(raw) if is_packed(raw) else json.loads(raw)
    return doc


class StoredRecords(Mapping[str, dict[str, Any]]):
    """A partition's stored slice records, decoded one at a time as they are read.

    Decoding them all before the first slice is built held every record's dicts and arrays at
    once: restoring 10,000 slices left ~90 MB of freed heap in the worker's RSS that the
    allocator could not return (benchmarks/results/detect_memory.md). :meth:`drain` hands each
    record over and forgets its bytes, so a restore holds one decoded record at a time."""

    def __init__(self, raw: Mapping[bytes, bytes]) -> None:
        self._raw = {k.decode(): v for k, v in raw.items()}

    def __getitem__(self, sid: str) -> dict[str, Any]:
        return decode_record(self._raw[sid])

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def drain(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every (slice id, record), each decoded as it comes and its bytes dropped."""
        while self._raw:
            sid, raw = self._raw.popitem()
            yield sid, decode_record(raw)


class RedisOutage:
    """Logs an outage as a stage sees it: a WARNING when it starts and every ``every_s`` while
    it lasts (how long, and what the stage holds back), an INFO line when Redis answers again."""

    def __init__(self, stage: str, every_s: float = 30.0) -> None:
        self.stage, self.every = stage, every_s
        self._since: float | None = None
        self._warned = -math.inf

    def down(self, what: str, exc: BaseException, **extra: Any) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._warned >= self.every:
            log.warning(f"{self.stage}: Redis unreachable: {what}",
                        extra={"error": repr(exc), "down_s": round(now - self._since, 1),
                               **extra})
            self._warned = now

    @property
    def active(self) -> bool:
        return self._since is not None

    def up(self) -> None:
        if self._since is not None:
            log.info(f"{self.stage}: Redis reachable again",
                     extra={"down_s": round(time.monotonic() - self._since, 1)})
            self._since, self._warned = None, -math.inf


class Fenced(RuntimeError):
    """Another worker claimed some of our partitions since we did (``stale``); our state for
    them is stale."""

    def __init__(self, stale: Iterable[int], detail: str) -> None:
        self.stale = frozenset(stale)
        super().__init__(f"partitions {sorted(self.stale)} {detail}")


class CheckpointStore:
    """Reads and writes detect-stage checkpoints for one consumer group."""

    def __init__(self, client: redis.Redis, prefix: str = "dl:detect",
                 wait_s: float = REDIS_WAIT_S) -> None:
        self.r = client
        self.prefix = prefix
        self.wait_s = wait_s  # how long a call retries an unreachable Redis

    @staticmethod
    @contextmanager
    def waiting_at_most(seconds: float) -> Iterator[None]:
        """Calls made by this thread in the block start no retry more than ``seconds`` after
        the block began (0: one attempt each), where waiting longer costs more than failing:
        in a rebalance listener, or during an outage the loop already retries. A block ends
        within ``seconds`` + one attempt's socket timeout, as a failed call ends it."""
        token = _deadline.set(time.monotonic() + seconds)
        try:
            yield
        finally:
            _deadline.reset(token)

    def _k(self, *parts: object) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    @property
    def outbox_key(self) -> str:
        return self._k("outbox")

    @property
    def summary_key(self) -> str:
        return self._k("summary")

    @property
    def control_key(self) -> str:
        return self._k("control")

    @retry_redis
    def control_after(self, after: str, count: int = 1000) -> list[ResetRequest]:
        """Reset requests after stream id ``after``, oldest first."""
        rows: list[Any] = self.r.xrange(  # type: ignore[assignment]
            self.control_key, min=f"({after}", count=count)

        def text(f: dict[bytes, bytes], key: bytes) -> str | None:
            return f[key].decode() if f.get(key) else None

        return [ResetRequest(eid.decode(), f[b"reset"].decode(),
                             f[b"detectors"].decode().split(",") if f.get(b"detectors") else None,
                             text(f, b"incident"), text(f, b"who"))
                for eid, f in rows if b"reset" in f]

    @retry_redis
    def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        """Take partitions: bump and return their epochs."""
        pipe = self.r.pipeline(transaction=True)
        parts = sorted(partitions)
        for p in parts:
            pipe.incr(self._k("epoch", p))
        return dict(zip(parts, (int(e) for e in pipe.execute()), strict=True))

    @retry_redis
    def load(self, partition: int) -> tuple[int | None, StoredRecords, str]:
        """The next input offset (None if never checkpointed), the slices' records (decoded as
        they are read: :class:`StoredRecords`) and the last control entry applied."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hget(self._k("offsets"), str(partition))
        pipe.hgetall(self._k("state", partition))
        pipe.hget(self._k("control_seen"), str(partition))
        offset, raw, seen = pipe.execute()
        return ((int(offset) if offset is not None else None), StoredRecords(raw),
                seen.decode() if seen else "0-0")

    def commit(
        self,
        epochs: Mapping[int, int],
        states: Mapping[int, Mapping[str, dict[str, Any] | bytes]],
        offsets: Mapping[int, int],
        outbox: Iterable[dict[str, Any]] = (),
        summaries: Mapping[str, dict[str, Any] | bytes] | None = None,
        control_seen: Mapping[int, str] | None = None,
        retired: Mapping[int, Iterable[str]] | None = None,
    ) -> None:
        """Write states, input offsets and alarms, and delete the state and summary fields of
        the ``retired`` slices (partition -> slice ids), atomically, if our epochs still hold.
        A state is a record or its :func:`encode_record` bytes, a summary likewise (the detect
        stage encodes each as it snapshots it: see ``DetectStage.checkpoint``).

        Raises :class:`Fenced` when another worker claimed a partition we write for. Retried
        on an outage like the other calls; a transaction whose reply was lost may have landed,
        so before writing alarms again a retry checks whether the input offsets already read as
        ours (every alarm comes from an update that moved some partition's offset since the last
        checkpoint): if so it landed, and writing again would put its alarms twice in the
        outbox.
        """
        gone = {p: list(sids) for p, sids in (retired or {}).items()}
        self._commit_retried([False], epochs, states, offsets, list(outbox), summaries,
                             control_seen, gone)

    @retry_redis
    def _commit_retried(self, tried: list[bool], epochs: Mapping[int, int],
                        states: Mapping[int, Mapping[str, dict[str, Any] | bytes]],
                        offsets: Mapping[int, int], alarms: list[dict[str, Any]],
                        summaries: Mapping[str, dict[str, Any] | bytes] | None,
                        control_seen: Mapping[int, str] | None,
                        gone: dict[int, list[str]]) -> None:
        """One attempt of :meth:`commit` (``tried[0]``: an earlier one was sent). Decorated
        once, on the class: a retry wrapper made per call refers to itself, and the cycle
        kept each checkpoint's records alive until a garbage collection."""
        if tried[0] and alarms and offsets and self._offsets_read(offsets):
            log.info("checkpoint had landed before its reply was lost; not written again")
            return
        tried[0] = True
        self._commit_once(epochs, states, offsets, alarms, summaries, control_seen, gone)

    @retry_redis
    def stored_offsets(self) -> dict[int, int]:
        """The next input offset checkpointed per partition."""
        raw: dict[bytes, bytes] = self.r.hgetall(self._k("offsets"))  # type: ignore[assignment]
        return {int(k): int(v) for k, v in raw.items()}

    @retry_redis
    def landed(self, offsets: Mapping[int, int]) -> bool:
        """Whether a commit of ``offsets`` landed: every one reads as stored (a caller whose
        commit failed after it may have been sent asks before writing its alarms again)."""
        return self._offsets_read(offsets)

    def _offsets_read(self, offsets: Mapping[int, int]) -> bool:
        parts = sorted(offsets)
        stored: list[bytes | None] = self.r.hmget(  # type: ignore[assignment]
            self._k("offsets"), [str(p) for p in parts])
        return all(v is not None and int(v) == offsets[p]
                   for p, v in zip(parts, stored, strict=True))

    def _commit_once(
        self,
        epochs: Mapping[int, int],
        states: Mapping[int, Mapping[str, dict[str, Any] | bytes]],
        offsets: Mapping[int, int],
        outbox: list[dict[str, Any]],
        summaries: Mapping[str, dict[str, Any] | bytes] | None,
        control_seen: Mapping[int, str] | None,
        retired: Mapping[int, list[str]] | None = None,
    ) -> None:
        retired = {p: sids for p, sids in (retired or {}).items() if sids}
        parts = sorted(set(states) | set(offsets) | set(retired))
        epoch_keys = [self._k("epoch", p) for p in parts]
        with self.r.pipeline(transaction=True) as pipe:
            try:
                if epoch_keys:
                    pipe.watch(*epoch_keys)  # type: ignore[no-untyped-call]
                    current: list[bytes | None] = pipe.mget(epoch_keys)  # type: ignore[assignment]
                    stale = _stale(parts, current, epochs)
                    if stale:
                        raise Fenced(stale, "were claimed by another worker")
                pipe.multi()
                # deletions first: a field both deleted and written ends up written
                for p, sids in retired.items():
                    pipe.hdel(self._k("state", p), *sids)
                if retired:
                    pipe.hdel(self.summary_key, *(sid for sids in retired.values()
                                                  for sid in sids))
                for p, slices in states.items():
                    if slices:
                        pipe.hset(self._k("state", p),
                                  mapping={sid: _encoded(rec, encode_record)
                                           for sid, rec in slices.items()})
                if offsets:
                    pipe.hset(self._k("offsets"),
                              mapping={str(p): str(o) for p, o in offsets.items()})
                if control_seen:
                    pipe.hset(self._k("control_seen"),
                              mapping={str(p): v for p, v in control_seen.items()})
                if summaries:
                    pipe.hset(self.summary_key,
                              mapping={sid: _encoded(v, encode_summary)
                                       for sid, v in summaries.items()})
                for alarm in outbox:
                    pipe.xadd(self.outbox_key, {"alarm": json.dumps(alarm)},
                              maxlen=OUTBOX_MAXLEN, approximate=True)
                pipe.execute()
            except WatchError as exc:
                # redis-py also raises WatchError when the connection drops while watching:
                # that is an outage (retried), not a fence
                if isinstance(exc.__context__, REDIS_ERRORS):
                    raise exc.__context__ from None
                now: list[bytes | None] = self.r.mget(epoch_keys)  # type: ignore[assignment]
                raise Fenced(_stale(parts, now, epochs) or parts,
                             "changed epoch during the checkpoint") from None

    def reset(self) -> None:
        """Delete every key of this store (tests and `driftline … --reset`)."""
        for key in self.r.scan_iter(match=f"{self.prefix}:*"):
            self.r.delete(key)


def _encoded(value: dict[str, Any] | bytes,
             encode: Callable[[dict[str, Any]], bytes]) -> bytes:
    return value if isinstance(value, bytes) else encode(value)


def _stale(parts: list[int], current: list[bytes | None], epochs: Mapping[int, int]) -> list[int]:
    return [p for p, cur in zip(parts, current, strict=True)
            if cur is None or int(cur) != epochs.get(p)]
