"""Path parameters holding '/': sent as %2F, each id is the segment the client sent."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from driftline.service.routes import EncodedSlashRoute

router = APIRouter(prefix="/things", route_class=EncodedSlashRoute)


@router.get("/{thing_id}/timeline")
def timeline(thing_id: str, since: int = 0) -> dict[str, object]:
    return {"route": "timeline", "id": thing_id, "since": since}


@router.get("/{thing_id}")
def detail(thing_id: str) -> dict[str, object]:
    return {"route": "detail", "id": thing_id}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router, prefix="/api")
    return TestClient(app)


@pytest.mark.parametrize(("path", "route", "thing"), [
    ("/api/things/plain", "detail", "plain"),
    ("/api/things/lot=2024%2F07", "detail", "lot=2024/07"),
    ("/api/things/lot=2024%2f07%2FL7/timeline", "timeline", "lot=2024/07/L7"),
    ("/api/things/a%2Ftimeline", "detail", "a/timeline"),  # not the timeline of 'a'
    ("/api/things/caf%C3%A9%2Fx", "detail", "café/x"),
])
def test_encoded_slashes_stay_in_their_segment(client: TestClient, path: str, route: str,
                                               thing: str) -> None:
    resp = client.get(path, params={"since": 3} if route == "timeline" else None)
    assert resp.status_code == 200, resp.text
    assert resp.json()["route"] == route and resp.json()["id"] == thing


def test_unencoded_slashes_are_path_segments(client: TestClient) -> None:
    assert client.get("/api/things/lot=2024/07").status_code == 404


def test_the_documented_path_is_unchanged(client: TestClient) -> None:
    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    assert set(paths) == {"/api/things/{thing_id}", "/api/things/{thing_id}/timeline"}
