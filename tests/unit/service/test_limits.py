"""Redis's answers that mean "not now" are a 503 with Retry-After, like Redis being down."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis._parsers.base import BaseParser
from redis.exceptions import (
    ConnectionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

import driftline.consumers.checkpoint  # noqa: F401 - as the app does: MISCONF gets its class
from driftline.service.limits import install_error_handlers

RAISED = {
    "readonly": ReadOnlyError("You can't write against a read only replica."),
    "oom": OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    "misconf": ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's "
                             "currently unable to persist to disk."),
    "down": ConnectionError("Error 111 connecting to redis:6379. Connection refused."),
    # as redis-py makes it from the server's reply once driftline is imported (its class for
    # MISCONF strips the code from the message)
    "misconf_reply": BaseParser().parse_error(
        "MISCONF Errors writing to the AOF file: No space left on device"),
    "bug": ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise/{what}")
    def raise_(what: str) -> None:
        raise RAISED[what]

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("what", ["readonly", "oom", "misconf", "misconf_reply", "down"])
def test_redis_that_cannot_serve_now_is_a_503_to_retry(client: TestClient, what: str) -> None:
    resp = client.get(f"/raise/{what}")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert str(RAISED[what]) in resp.json()["detail"]


def test_another_redis_error_is_a_500_that_says_where(client: TestClient) -> None:
    resp = client.get("/raise/bug")
    assert resp.status_code == 500
    assert "Redis refused a command" in resp.json()["detail"]
    assert "WRONGTYPE" not in resp.json()["detail"]  # internals stay in the log
