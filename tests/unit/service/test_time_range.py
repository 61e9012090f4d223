"""A ``since`` after ``until`` is a 422 naming both, as for any other bad query value: the
routes answered 200 with nothing in the range, which reads as "nothing happened"."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline.config import load_settings
from driftline.service.app import create_app
from tests.unit.service.test_json_body import ReadOnlyRedis

ROUTES = ["/api/v1/incidents", "/api/v1/slices/station=s1/timeline", "/api/v1/gap",
          "/api/v1/versions/compare"]


def query(route: str, **times: str | None) -> dict[str, str]:
    versions = {"a": "v1", "b": "v2"} if route.endswith("compare") else {}
    return versions | {k: v for k, v in times.items() if v is not None}


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Redis refuses every command: a request past the range check gets its 503
    app = create_app(CollectorRegistry(), None, load_settings(),
                     redis_client=ReadOnlyRedis())  # type: ignore[arg-type]
    return TestClient(app)


@pytest.mark.parametrize("route", ROUTES)
def test_since_after_until_is_a_422_naming_both(client: TestClient, route: str) -> None:
    resp = client.get(route, params=query(route, since="2026-11-17",
                                          until="2026-11-16T23:59:59Z"))
    assert resp.status_code == 422, resp.text
    (err,) = resp.json()["detail"]  # the shape of FastAPI's other query errors
    assert err["loc"] == ["query", "since"] and err["type"] == "value_error"
    assert err["msg"].startswith("since (2026-11-17T00:00:00Z) is after until "
                                 "(2026-11-16T23:59:59Z)")
    assert client.app.openapi()["paths"][  # type: ignore[attr-defined]
        route.replace("station=s1", "{slice_id}")]["get"]["responses"]["422"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("since", "until"), [
    ("2026-11-16T06:00:00Z", "2026-11-16T06:00:00Z"),  # one instant: inclusive
    ("2026-11-16T08:00:00+02:00", "2026-11-16T06:00:00Z"),  # the same instant, two zones
    ("2026-11-16", None), (None, "2026-11-16")])
def test_an_ordered_or_open_range_passes_the_check(client: TestClient, route: str,
                                                   since: str | None,
                                                   until: str | None) -> None:
    assert client.get(route, params=query(route, since=since, until=until)).status_code != 422


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("since", "until", "inverted"), [
    ("0001-01-01T00:00:00+05:00", "2026-11-16T06:00:00Z", False),  # before year 1 in UTC
    ("2026-11-16T06:00:00Z", "9999-12-31T23:59:59-05:00", False),  # after year 9999 in UTC
    ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", True)])
def test_times_at_the_ends_of_the_calendar_are_compared_not_a_500(
        route: str, since: str, until: str, inverted: bool) -> None:
    """A valid date-time whose UTC form falls outside datetime's years 1-9999 is still
    ordered against the other end (the routes read it as seconds since 1970 alike): not an
    OverflowError and a 500 from converting it to UTC."""
    app = create_app(CollectorRegistry(), None, load_settings(),
                     redis_client=ReadOnlyRedis())  # type: ignore[arg-type]
    resp = TestClient(app, raise_server_exceptions=False).get(
        route, params=query(route, since=since, until=until))
    if inverted:
        assert resp.status_code == 422, resp.text
        (err,) = resp.json()["detail"]
        assert err["msg"].startswith(f"since ({since}) is after until ({until})")
    else:
        assert resp.status_code == 503, resp.text  # past the check, to the (refusing) Redis
