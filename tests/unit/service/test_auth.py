"""Bearer-token authentication, role checks and the body limit, without Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.testclient import TestClient
from pydantic import SecretStr

from driftline.config import load_settings
from driftline.service.context import ServiceContext
from driftline.service.deps import Caller, authenticate, require
from driftline.service.limits import BodyLimit

TOKENS = "vic:viewer:viewer-token-0123456789,olga:operator:operator-token-012345"


def ctx(tokens: str | None) -> ServiceContext:
    settings = load_settings(api_tokens=SecretStr(tokens) if tokens else None)
    # The client never connects: nothing here talks to Redis.
    return ServiceContext.build(settings, redis.Redis(host="127.0.0.1", port=1))


def bearer(token: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_tokens_map_to_names_and_roles() -> None:
    c = ctx(TOKENS)
    assert run(authenticate(c, bearer("viewer-token-0123456789"))) == Caller("vic", "viewer")
    assert run(authenticate(c, bearer("operator-token-012345"))) == Caller("olga", "operator")
    for creds in (None, bearer(""), bearer("viewer-token-012345678"), bearer("x" * 40)):
        with pytest.raises(HTTPException) as err:
            run(authenticate(c, creds))
        assert err.value.status_code == 401
        assert err.value.headers == {"WWW-Authenticate": "Bearer"}


def test_roles_rank_viewer_operator_admin() -> None:
    c = ctx(TOKENS)
    operator, viewer = Caller("olga", "operator"), Caller("vic", "viewer")
    assert run(require("viewer")(c, operator)) == operator
    assert run(require("operator")(c, operator)) == operator
    for role, who in (("operator", viewer), ("admin", operator)):
        with pytest.raises(HTTPException) as err:
            run(require(role)(c, who))
        assert err.value.status_code == 403 and role in str(err.value.detail)
    with pytest.raises(ValueError, match="unknown role"):
        require("root")


def test_without_tokens_reads_are_anonymous_and_changes_refused() -> None:
    c = ctx(None)
    anon = run(authenticate(c, None))
    assert anon.role == "viewer" and run(require("viewer")(c, anon)) == anon
    with pytest.raises(HTTPException) as err:
        run(require("operator")(c, anon))
    assert err.value.status_code == 403 and "DRIFTLINE_API_TOKENS" in str(err.value.detail)


def test_body_limit_refuses_declared_and_streamed_bodies() -> None:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.add_middleware(BodyLimit, max_bytes=1024)
    with TestClient(app) as client:
        assert client.post("/echo", content=b"x" * 1024).json() == {"bytes": 1024}
        big = client.post("/echo", content=b"x" * 1025)
        assert big.status_code == 413 and "1024 bytes" in big.json()["detail"]
        streamed = client.post("/echo", content=iter([b"x" * 600, b"x" * 600]))
        assert streamed.status_code == 413
        bad = client.post("/echo", content=b"{}", headers={"Content-Length": "abc"})
        assert bad.status_code == 400
