"""API request metrics keep their label values bounded whatever a client sends."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from driftline.service.observe import ApiMetrics, Observe


def test_a_made_up_method_is_counted_as_other() -> None:
    """The HTTP parser takes any token as a method: X0, X1, ... must not each start a series."""
    app = FastAPI()

    @app.get("/things/{thing_id}")
    def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    registry = CollectorRegistry()
    app.add_middleware(Observe, metrics=ApiMetrics(registry), routes={thing: "/things/{thing_id}"})
    client = TestClient(app)
    assert client.get("/things/a").status_code == 200
    for k in range(5):
        assert client.request(f"X{k}", "/things/a").status_code == 405

    methods = {s.labels["method"] for m in registry.collect() for s in m.samples
               if s.name == "driftline_api_requests_total"}
    assert methods == {"GET", "other"}
    assert registry.get_sample_value("driftline_api_requests_total", {
        "route": "/things/{thing_id}", "method": "other", "status": "405"}) == 5
