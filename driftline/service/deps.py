"""Annotated dependencies: settings, Redis, the failure book, the reference and the caller.

**Authentication.** ``Authorization: Bearer <token>``; the sha256 of the presented token is
compared with every configured token's hash with :func:`hmac.compare_digest` (all of them,
so the time taken does not tell which entry nearly matched). Missing or unknown token: 401
with ``WWW-Authenticate: Bearer``; a known token whose role ranks below the endpoint's: 403.
Roles rank ``viewer < operator < admin``: reads need viewer, incident mutations operator,
reference activation admin.

Dependencies that only read memory are ``async`` so that FastAPI runs them on the event loop
instead of a thread-pool hop each; endpoints doing Redis I/O stay synchronous (thread pool).

**No tokens configured.** Start-up logs a warning in capitals; reads are answered without a
token (the caller is ``anonymous``, a viewer) and every mutating call is refused with 403 —
an unconfigured deployment can be looked at but not changed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from driftline.alerts.book import FailureBook
from driftline.config import ROLES, Settings
from driftline.reference.index import Reference
from driftline.service.context import ServiceContext

ANONYMOUS = "anonymous"
_bearer = HTTPBearer(auto_error=False, description="A token from DRIFTLINE_API_TOKENS")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's configured name (recorded in incident timelines) and role."""

    name: str
    role: str


async def get_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[ServiceContext, Depends(get_context)]


async def get_settings(ctx: ContextDep) -> Settings:
    return ctx.settings


async def get_redis(ctx: ContextDep) -> redis.Redis:
    return ctx.redis


async def get_book(ctx: ContextDep) -> FailureBook:
    return ctx.book


def get_reference(ctx: ContextDep) -> Reference | None:
    return ctx.reference()


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
BookDep = Annotated[FailureBook, Depends(get_book)]
ReferenceDep = Annotated[Reference | None, Depends(get_reference)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail,
                         headers={"WWW-Authenticate": "Bearer"})


async def authenticate(ctx: ContextDep, creds: CredentialsDep) -> Caller:
    """The caller, or 401. Without configured tokens every caller is an anonymous viewer."""
    if not ctx.tokens:
        return Caller(ANONYMOUS, "viewer")
    if creds is None or not creds.credentials:
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    presented = hashlib.sha256(creds.credentials.encode()).hexdigest()
    found: Caller | None = None
    for token in ctx.tokens:  # no early exit: constant work whichever entry matches
        if hmac.compare_digest(presented, token.sha256) and found is None:
            found = Caller(token.name, token.role)
    if found is None:
        raise _unauthorized("invalid bearer token")
    return found


CallerDep = Annotated[Caller, Depends(authenticate)]


def require(role: str) -> Callable[[ServiceContext, Caller], Awaitable[Caller]]:
    """A dependency admitting callers whose role ranks at least ``role``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {ROLES}")
    need = ROLES.index(role)

    async def check(ctx: ContextDep, caller: CallerDep) -> Caller:
        if need > 0 and not ctx.tokens:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=(
                "no API tokens are configured (DRIFTLINE_API_TOKENS): mutating calls are "
                "refused until tokens with roles are configured"))
        if ROLES.index(caller.role) < need:
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=(
                f"token {caller.name!r} has role {caller.role!r}; this call needs {role!r}"))
        return caller
    return check


async def strict_query(request: Request) -> None:
    """400 for a query parameter the endpoint does not take: a typo such as ``?stauts=open``
    must not silently return everything."""
    allowed = getattr(request.app.state, "query_names", {}).get(request.scope.get("endpoint"))
    if allowed is None:
        return
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=(
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this endpoint takes "
            f"{', '.join(sorted(allowed)) or 'none'}"))


_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


async def json_body(request: Request) -> None:
    """415 for a body that is not sent as JSON. FastAPI reads such a body as bytes and answers
    422 "Input should be a valid dictionary", echoing the JSON the caller typed: what
    ``curl -d '{"category": "optics"}'`` gets, since curl sends it as a form."""
    if request.method not in _WITH_BODY:
        return
    sent = request.headers.get("content-type")
    main, _, sub = (sent or "").partition(";")[0].strip().lower().partition("/")
    if main == "application" and (sub == "json" or sub.endswith("+json")):
        return
    if await request.body():
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, detail=(
            "the body must be JSON sent with Content-Type: application/json (got "
            f"{repr(sent) if sent else 'no Content-Type'}; with curl, add "
            "-H 'Content-Type: application/json')"))


Viewer = Annotated[Caller, Depends(require("viewer"))]
Operator = Annotated[Caller, Depends(require("operator"))]
Admin = Annotated[Caller, Depends(require("admin"))]
