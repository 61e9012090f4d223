"""Shared response parts: the error body and the documented error statuses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from driftline.alerts.model import iso


def _a_date_time(value: Any) -> Any:
    """A query's time is a date-time, as the API documents; pydantic would also read a number
    (``until=1e-38``) as seconds since 1970.

    >>> _a_date_time("2026-11-23T08:00:00Z")
    '2026-11-23T08:00:00Z'
    >>> _a_date_time("1700000000")
    Traceback (most recent call last):
    ...
    ValueError: a date-time such as 2026-11-23T08:00:00Z, not a number
    """
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("a date-time such as 2026-11-23T08:00:00Z, not a number")
    return value


QueryTime = Annotated[datetime, BeforeValidator(_a_date_time)]


def time_range(since: datetime | None, until: datetime | None) -> None:
    """A 422, as for any other bad query value (FastAPI's list of field errors), when
    ``since`` is after ``until``: that range holds nothing, and an empty answer would read as
    "nothing happened". A time without a zone is UTC, as the routes read it."""
    if since is None or until is None:
        return
    # aware times compare by instant across zones; not converted to UTC for it, which
    # overflows for one whose UTC form is outside years 1-9999 (0001-01-01T00:00:00+05:00)
    lo, hi = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (since, until))
    if lo > hi:
        def utc(t: datetime) -> str:
            try:
                t = t.astimezone(UTC)
            except OverflowError:  # no UTC form: as given, with its offset
                pass
            return str(iso(t))
        raise RequestValidationError([{
            "type": "value_error", "loc": ("query", "since"), "input": utc(lo),
            "msg": f"since ({utc(lo)}) is after until ({utc(hi)}): since must be at or "
                   "before until"}])


class ErrorBody(BaseModel):
    """Every 4xx/5xx body of the API (FastAPI's 422 adds a list of field errors)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "no incident DL-000042"}]})

    detail: str = Field(description="what went wrong, in words an operator can act on")


_WHY = {
    400: "malformed request: a body that is not valid JSON, bad Content-Length, unknown "
         "query parameter",
    401: "missing or invalid bearer token",
    403: "the token's role may not do this",
    404: "no such resource",
    409: "the incident's lifecycle does not allow this step",
    413: "request body larger than DRIFTLINE_MAX_REQUEST_BYTES",
    415: "a request body not sent as JSON (Content-Type: application/json)",
    503: "a backing store (Redis, the reference) is unavailable",
}


def errors(*codes: int, why: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting ``codes`` with :class:`ErrorBody`; ``why`` replaces
    the shared description of a code where it means something else on that route."""
    why = why or {}
    return {code: {"model": ErrorBody, "description": why.get(code, _WHY[code])}
            for code in codes}


# Every /api/v1 route can answer these (malformed request, auth, body size, store down).
COMMON_ERRORS = errors(400, 401, 403, 413, 503)
