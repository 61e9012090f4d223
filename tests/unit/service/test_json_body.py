"""A request body not sent as JSON is a 415 that says how to send it, not a puzzling 422."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from driftline.config import load_settings
from driftline.service.app import create_app
from driftline.service.limits import MAX_ECHO_CHARS, MAX_FIELD_ERRORS

TOKENS = "olga:operator:operator-token-0123456789"
RESOLVE = "/api/v1/incidents/DL-000001/resolve"
BODY = '{"category": "optics"}'


class ReadOnlyRedis:
    """Every command refused at once, as by a replica after a failover: a 503 not retried
    (no server, no wait)."""

    connection_pool = SimpleNamespace(connection_kwargs={"host": "stub", "port": 0})

    def __getattr__(self, name: str) -> Any:
        def fail(*_: Any, **__: Any) -> Any:
            raise redis.ReadOnlyError(f"{name}: You can't write against a read only replica.")
        return fail


@pytest.fixture(scope="module")
def client() -> TestClient:
    settings = load_settings(api_tokens=SecretStr(TOKENS))
    # Redis is never reached by a refused request; one that passes gets Redis's 503.
    app = create_app(CollectorRegistry(), None, settings,
                     redis_client=ReadOnlyRedis())  # type: ignore[arg-type]
    return TestClient(app, headers={"Authorization": f"Bearer {TOKENS.rsplit(':', 1)[1]}"})


@pytest.mark.parametrize(("sent", "named"), [
    ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),  # curl -d
    ("text/plain; charset=utf-8", "'text/plain; charset=utf-8'"),
    (None, "no Content-Type"),
])
def test_a_body_not_sent_as_json_is_a_415_naming_its_type(client: TestClient, sent: str | None,
                                                          named: str) -> None:
    headers = {"Content-Type": sent} if sent else {}
    resp = client.post(RESOLVE, content=BODY, headers=headers)
    if sent is None:  # httpx adds no type to raw content: check what reached the app
        assert "content-type" not in resp.request.headers
    assert resp.status_code == 415, resp.text
    detail = resp.json()["detail"]
    assert named in detail and "Content-Type: application/json" in detail


@pytest.mark.parametrize("sent", ["application/json", "application/json; charset=utf-8",
                                  "application/merge-patch+json"])
def test_json_bodies_pass_to_validation(client: TestClient, sent: str) -> None:
    resp = client.post(RESOLVE, content='{"category": "gremlins"}',
                       headers={"Content-Type": sent})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "category"]


def test_no_body_and_reads_are_not_refused(client: TestClient) -> None:
    ack = client.post("/api/v1/incidents/DL-000001/acknowledge",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ack.status_code == 503  # past the check, to the book and its (refusing) Redis
    read = client.request("GET", "/api/v1/incidents/DL-000001", content=b"x",
                          headers={"Content-Type": "text/plain"})
    assert read.status_code == 503


def test_the_415_is_documented_on_the_routes_that_take_a_body(client: TestClient) -> None:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    with_415 = sorted(f"{m.upper()} {p}" for p, ops in paths.items()
                      for m, op in ops.items() if "415" in op.get("responses", {}))
    assert with_415 == sorted(f"POST {p}" for p, ops in paths.items() if "post" in ops)


@pytest.mark.parametrize(("body", "why"), [
    ('{"category": optics}', "Expecting value at character 13"),
    ('{"category": "optics"', "Expecting ',' delimiter at character 21"),
])
def test_a_body_that_is_not_json_is_a_documented_400_saying_where(
        client: TestClient, body: str, why: str) -> None:
    """Not FastAPI's 422 ``json_invalid`` (a field error naming no field): the 400 that every
    route documents for a malformed request, in the ``{"detail": "…"}`` shape of the others."""
    resp = client.post(RESOLVE, content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"detail": f"the request body is not valid JSON: {why}"}
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    documented = paths["/api/v1/incidents/{incident_id}/resolve"]["post"]["responses"]["400"]
    assert "not valid JSON" in documented["description"]
    assert documented["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}


@pytest.mark.parametrize(("body", "shown"), [
    ('{"category": NaN}', "nan"),
    ('{"category": 1e309}', "inf"),  # valid JSON, read as inf
    ('{"category": "optics", "note": -Infinity}', "-inf"),
    ('{"category": "\\ud800"}', "'\\ud800'"),  # a lone surrogate: no UTF-8 reply holds it
])
def test_a_value_no_json_reply_can_hold_is_a_422_not_a_500(client: TestClient, body: str,
                                                            shown: str) -> None:
    """FastAPI's 422 echoes the refused value, and rendering these raised: a 500."""
    resp = client.post(RESOLVE, content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["input"] == shown


def test_a_422_is_bounded_whatever_the_body_holds(client: TestClient) -> None:
    """A body of a few thousand unknown keys got one error per key, the whole body echoed in
    the first: 1 MiB in, 9 MB and seconds of encoding out."""
    body = {"category": "optics", **{f"k{i}": "x" * 50 for i in range(5000)}}
    resp = client.post(RESOLVE, json=body)
    assert resp.status_code == 422
    assert len(resp.json()["detail"]) == MAX_FIELD_ERRORS and len(resp.content) < 10_000
    long = client.post(RESOLVE, json={"category": "optics", "note": "y" * 5000})
    assert long.status_code == 422
    assert long.json()["detail"][0]["input"] == "y" * MAX_ECHO_CHARS + "…"
