"""API request metrics: a pure ASGI middleware (cheap on the hot path).

``driftline_api_requests_total{route, method, status}`` and
``driftline_api_request_duration_seconds{route}``; ``route`` is the route template
(``/api/v1/incidents/{incident_id}``), never an id, and ``method`` one of :data:`METHODS` or
``other``, so label values stay bounded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The HTTP parser accepts any token as a method: one a client makes up is counted as "other",
# or each new one would start a series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("driftline_api_requests_total", "API requests",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("driftline_api_request_duration_seconds",
                                 "API request latency", ["route"], buckets=_BUCKETS,
                                 registry=registry)


class Observe:
    """``routes`` maps each endpoint function to its full path template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: Mapping[Any, str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = [500]

        async def watch(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                code[0] = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = self.routes.get(scope.get("endpoint"), "unmatched")
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            self.metrics.requests.labels(route, method, str(code[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
