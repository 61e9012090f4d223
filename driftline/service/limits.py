"""Request size limit and the exception → ``{"detail": …}`` mapping.

The size limit is checked twice: a declared ``Content-Length`` above the limit is refused
before the app sees the request; a chunked body is counted as it arrives and refused (413) as
soon as it passes the limit, so an endpoint never buffers more than the limit.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from driftline.alerts.book import IncidentNotFound, InvalidTransition
from driftline.consumers.checkpoint import CannotPersistError

log = logging.getLogger(__name__)
# Redis's refusals that pass: the client asks again later (503), as when Redis is down
_REFUSALS = (ReadOnlyError, OutOfMemoryError, MasterDownError, ClusterDownError, TryAgainError,
             CannotPersistError)
# A 422 lists at most this many field errors, each echoing at most this much of the value it
# refuses: a 1 MiB body of unknown keys got 9 MB back, after seconds of encoding.
MAX_FIELD_ERRORS = 20
MAX_ECHO_CHARS = 200


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413,
                         detail=f"request body larger than {limit} bytes "
                                "(DRIFTLINE_MAX_REQUEST_BYTES)")


class BodyLimit:
    """Pure ASGI middleware enforcing ``max_bytes`` per request body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_json(send, 400, "Content-Length is not a number")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await _send_json(send, 413, BodyTooLarge(self.max_bytes).detail)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return msg

        await self.app(scope, limited, send)


async def _send_json(send: Send, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    """Domain exceptions become clear 4xx/503 bodies instead of 500s."""

    async def not_found(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"no incident {exc.args[0] if exc.args else ''}"
                                       " (never existed, or removed by retention)"},
                            status_code=404)

    async def conflict(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    async def store_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"Redis is unavailable: {exc}"}, status_code=503,
                            headers={"Retry-After": "5"})

    async def invalid(_: Request, exc: Exception) -> Response:
        """A body that is not JSON at all is a malformed request (400, as documented), not a
        422 ``json_invalid`` field error naming no field; other validation errors keep
        FastAPI's 422 with its list of field errors (:func:`field_errors`)."""
        if not isinstance(exc, RequestValidationError):  # registered for it alone
            raise exc
        bad = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if bad is None:
            return JSONResponse({"detail": field_errors(exc)}, status_code=422)
        why = (bad.get("ctx") or {}).get("error") or "cannot be decoded"
        return JSONResponse({"detail": f"the request body is not valid JSON: {why} at "
                                       f"character {bad['loc'][-1]}"}, status_code=400)

    app.add_exception_handler(IncidentNotFound, not_found)
    app.add_exception_handler(InvalidTransition, conflict)
    app.add_exception_handler(RequestValidationError, invalid)
    async def store_refused(_: Request, exc: Exception) -> JSONResponse:
        """Redis answered but cannot serve now: a replica after a failover (READONLY), out of
        memory, unable to persist (MISCONF), a master or cluster down. Another reply from Redis
        is a bug: a 500 whose detail says so (the log has the trace)."""
        if isinstance(exc, _REFUSALS) or "MISCONF" in str(exc):
            return JSONResponse({"detail": f"Redis cannot serve this now: {exc}"},
                                status_code=503, headers={"Retry-After": "5"})
        log.error("Redis refused a command", exc_info=exc)
        return JSONResponse({"detail": "internal error: Redis refused a command (see the API's "
                                       "log)"}, status_code=500)

    app.add_exception_handler(RedisConnectionError, store_down)
    app.add_exception_handler(RedisTimeoutError, store_down)
    app.add_exception_handler(RedisResponseError, store_refused)


def field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's list of field errors, at most :data:`MAX_FIELD_ERRORS`, each ``input`` as
    :func:`echo` shows it."""
    shown = [{**e, "input": echo(e["input"])} if "input" in e else e
             for e in exc.errors()[:MAX_FIELD_ERRORS]]
    return list(jsonable_encoder(shown))


def echo(value: Any) -> Any:
    r"""A refused value as a 422 shows it: as sent if a JSON reply can hold it in at most
    :data:`MAX_ECHO_CHARS`, else the start of its text. The JSON parser reads ``NaN``,
    ``Infinity``, ``1e309`` (inf) and lone surrogates (``"\ud800"``), which no JSON reply can
    hold: FastAPI's own 422 for them was a 500.

    >>> echo("optics"), echo(float("nan")), echo("a\ud800"), echo({"note": float("inf")})
    ('optics', 'nan', "'a\\ud800'", "{'note': inf}")
    >>> len(echo("x" * 5000))
    201
    """
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        text.encode()
    except (TypeError, ValueError):  # NaN or inf; a lone surrogate (UnicodeEncodeError)
        text = ascii(value)
    else:
        if len(text) <= MAX_ECHO_CHARS:
            return value
        text = value if isinstance(value, str) else text
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "…"
