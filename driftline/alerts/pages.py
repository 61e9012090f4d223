"""Pages of the failure book's incident list: filters, cursor paging, and light rows.

The book keeps a sorted set per status, severity and station/shift/lot value, scored by
detection time (layout: :mod:`driftline.alerts.store`). A page walks the most selective index
that applies newest first, checks the remaining filters on each parsed record, and returns the
cursor ``"<score>:<id>"`` of its last row only when another row follows. It reads
``limit + 1`` entries first and doubles the chunk only while filters skip entries, so an
unfiltered page of 50 reads and parses 51 records.

The cursor is a position in that order, not a snapshot: an incident whose detection time moves
while a client pages (a merge or a re-root gives it its new root's first detection) can show on
two pages or on none, as an incident opened meanwhile is not seen by pages already past it.

:class:`IncidentRow` is the part of an incident a list row shows: it skips the evidence,
per-slice counts and timeline, which makes a page of 50 about three times cheaper to parse than
full :class:`~driftline.alerts.model.Incident` records (most of the API's CPU for a list).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from driftline.alerts.model import (
    Incident,
    RecurrenceLink,
    RootCause,
    Severity,
    SliceRef,
    Status,
)

MAX_CHUNK = 1000  # index entries per read once filters skip many: bounds one reply's size


class Query(TypedDict, total=False):
    """The list's filters and paging; every key is optional (``limit`` defaults to 50)."""

    status: Status | None
    severity: Severity | None
    station: str | None
    shift: str | None
    lot: str | None
    since: datetime | None
    until: datetime | None
    limit: int
    cursor: str | None  # the previous page's ``next_cursor``


class Listed(Protocol):
    """What the filters read of a record (:class:`Incident` or :class:`IncidentRow`)."""

    @property
    def status(self) -> Status: ...
    @property
    def severity(self) -> Severity: ...
    @property
    def root(self) -> SliceRef: ...
    @property
    def related(self) -> Sequence[SliceRef]: ...


R = TypeVar("R", bound=Listed)


@dataclass(frozen=True)
class Page(Generic[R]):
    items: list[R]
    next_cursor: str | None


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Firing(_Named):
    detector: str


class _Resolution(_Named):
    category: RootCause


class IncidentRow(_Named):
    """The part of a stored :class:`~driftline.alerts.model.Incident` a list row shows."""

    schema_version: int
    id: str
    status: Status
    severity: Severity
    root: SliceRef
    related: list[SliceRef] = []
    detectors: list[_Firing] = []
    onset: datetime | None = None
    detected_at: datetime
    resolved_at: datetime | None = None
    resolution: _Resolution | None = None
    auto_resolved: bool = False
    merged_into: str | None = None
    held: bool = False
    recurrence: list[RecurrenceLink] = []

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return Incident._known_version(v)  # the full record's check, so both refuse alike


def read_page(r: Any, k: Callable[..., str], parse: Callable[[bytes], R],
              query: Query) -> Page[R]:
    """One page of the index walk; ``r`` is the book's client, ``k`` its key builder."""
    status, severity = query.get("status"), query.get("severity")
    dims = {"lot": query.get("lot"), "station": query.get("station"),
            "shift": query.get("shift")}
    key = next((k("idx", d, v) for d, v in dims.items() if v is not None),
               k("idx", "severity", severity.value) if severity else
               k("idx", "status", status.value) if status else k("idx", "all"))
    since, until, cursor = query.get("since"), query.get("until"), query.get("cursor")
    hi = until.timestamp() if until else float("inf")
    lo = since.timestamp() if since else float("-inf")
    after: tuple[float, str] | None = None
    if cursor:
        at, _, iid = cursor.partition(":")
        after = (float(at), iid)
        hi = min(hi, after[0])
    wanted = [(d, v) for d, v in dims.items() if v is not None]

    def keeps(row: R) -> bool:
        refs = (row.root, *row.related)
        return (status is None or row.status is status) and (
            severity is None or row.severity is severity) and all(
            any(ref.dims.get(d) == v for ref in refs) for d, v in wanted)

    limit = query.get("limit", 50)
    items: list[R] = []
    last: tuple[float, str] | None = None
    offset, chunk = 0, limit + 1
    while True:
        rows = r.zrevrangebyscore(key, hi, lo, start=offset, num=chunk, withscores=True)
        if not rows:
            return Page(items, None)
        offset += len(rows)
        # Equal scores come in reverse id order: skip those the previous page returned.
        pairs = [(m.decode(), float(s)) for m, s in rows]
        pairs = [(i, s) for i, s in pairs
                 if after is None or s < after[0] or (s == after[0] and i < after[1])]
        raws = r.mget([k("inc", i) for i, _ in pairs]) if pairs else []
        for (iid, score), raw in zip(pairs, raws, strict=True):
            if raw is None:  # removed by retention between the two reads
                continue
            row = parse(raw)
            if not keeps(row):
                continue
            if len(items) == limit and last is not None:  # one more exists: not the last page
                return Page(items, f"{last[0]!r}:{last[1]}")
            items.append(row)
            last = (score, iid)
        if len(rows) < chunk:
            return Page(items, None)
        chunk = min(chunk * 2, MAX_CHUNK)
