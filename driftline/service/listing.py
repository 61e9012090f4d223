"""Incident pages for the API: :meth:`FailureBook.list`'s filters and cursors, fetched in
chunks sized to the page.

``FailureBook.list`` reads its index 200 entries at a time and parses every incident it reads,
so a page of 50 costs 200 parses; under 50 concurrent clients that parse is most of the API's
CPU. This helper walks the same indexes (layout: :mod:`driftline.alerts.store`) with the same
order, filters and cursor format (``"<score>:<id>"``, interchangeable with the book's), but reads
``limit + 1`` entries first and doubles the chunk only while filters skip entries, and parses
each incident into :class:`IncidentRow`, which skips the evidence, per-slice counts and
timeline a list row does not show.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from driftline.alerts.book import FailureBook
from driftline.alerts.model import (
    SCHEMA_VERSION,
    RecurrenceLink,
    RootCause,
    Severity,
    SliceRef,
    Status,
)
from driftline.alerts.store import retry_redis

_MAX_CHUNK = 1000


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
    recurrence: list[RecurrenceLink] = []

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"incident schema_version {v} is not {SCHEMA_VERSION}")
        return v

    def dims(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for ref in (self.root, *self.related):
            for k, v in ref.dims.items():
                out.setdefault(k, set()).add(v)
        return out


@dataclass(frozen=True)
class RowPage:
    items: list[IncidentRow]
    next_cursor: str | None


@retry_redis
def incident_page(book: FailureBook, *, status: Status | None = None,
                   severity: Severity | None = None, station: str | None = None,
                   shift: str | None = None, lot: str | None = None,
                   since: datetime | None = None, until: datetime | None = None,
                   limit: int = 50, cursor: str | None = None) -> RowPage:
    """Newest detection first; ``next_cursor`` is None on the last page."""
    r: Any = book.r
    dims = {"lot": lot, "station": station, "shift": shift}
    key = next((book.k("idx", d, v) for d, v in dims.items() if v is not None),
               book.k("idx", "severity", severity.value) if severity else
               book.k("idx", "status", status.value) if status else book.k("idx", "all"))
    hi = until.timestamp() if until else float("inf")
    lo = since.timestamp() if since else float("-inf")
    after: tuple[float, str] | None = None
    if cursor:
        at, _, iid = cursor.partition(":")
        after = (float(at), iid)
        hi = min(hi, after[0])
    items: list[IncidentRow] = []
    last: tuple[float, str] | None = None
    offset, chunk = 0, limit + 1
    while True:
        rows = r.zrevrangebyscore(key, hi, lo, start=offset, num=chunk, withscores=True)
        if not rows:
            return RowPage(items, None)
        offset += len(rows)
        # Equal scores come in reverse id order: skip those the previous page returned.
        pairs = [(m.decode(), float(s)) for m, s in rows]
        pairs = [(i, s) for i, s in pairs
                 if after is None or s < after[0] or (s == after[0] and i < after[1])]
        raws = r.mget([book.k("inc", i) for i, _ in pairs]) if pairs else []
        for (iid, score), raw in zip(pairs, raws, strict=True):
            if raw is None:
                continue
            inc = IncidentRow.model_validate_json(raw)
            if (status and inc.status is not status) or (severity and inc.severity
                                                         is not severity):
                continue
            found = inc.dims()
            if any(v is not None and v not in found.get(d, ()) for d, v in dims.items()):
                continue
            if len(items) == limit and last is not None:  # one more exists: not the last page
                return RowPage(items, f"{last[0]!r}:{last[1]}")
            items.append(inc)
            last = (score, iid)
        if len(rows) < chunk:
            return RowPage(items, None)
        chunk = min(chunk * 2, _MAX_CHUNK)
