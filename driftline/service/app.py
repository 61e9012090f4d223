"""FastAPI app factory: probes, metrics and the triage API under ``/api/v1``.

``create_app(registry, readiness)`` alone serves the probes and ``/metrics`` of a stage process;
with ``settings`` it also mounts the triage routers on a Redis client and the failure book.
``serve(settings)`` runs the API under uvicorn until SIGTERM (``driftline serve``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi import APIRouter, Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import driftline
from driftline.config import Settings
from driftline.service.context import ServiceContext
from driftline.service.deps import json_body, require, strict_query
from driftline.service.limits import BodyLimit, install_error_handlers
from driftline.service.observe import ApiMetrics, Observe
from driftline.service.routes import gap, incidents, references, similar, slices, versions
from driftline.service.schemas.common import errors

Readiness = Callable[[], dict[str, bool]]
API_PREFIX = "/api/v1"

def create_app(registry: CollectorRegistry, readiness: Readiness | None = None,
               settings: Settings | None = None, *,
               redis_client: redis.Redis | None = None,
               liveness: Readiness | None = None) -> FastAPI:
    """Build the HTTP app. ``readiness`` returns named checks; all must be true for /readyz;
    ``liveness`` likewise for /healthz (no checks: the process answers).

    With ``settings`` the triage API is mounted (Redis from ``settings.redis_url`` unless
    ``redis_client`` is given) and the probes need a viewer token unless
    ``settings.open_probes``.
    """
    app = FastAPI(title="driftline", version=driftline.__version__,
                  description="Drift monitoring for vision models: triage API. Authenticate "
                              "with `Authorization: Bearer <token>` (DRIFTLINE_API_TOKENS); "
                              "reads need role viewer, incident changes operator, reference "
                              "activation admin.")
    ctx: ServiceContext | None = None
    if settings is not None:
        ctx = ServiceContext.build(settings, redis_client)
        app.state.ctx = ctx
    checks = _readiness(readiness, ctx)
    guard = [] if settings is None or settings.open_probes else [Depends(require("viewer"))]
    probes = APIRouter(tags=["probes"], dependencies=guard,
                       responses=errors(401, 403) if guard else None)

    @probes.get("/healthz", responses={503: {"description": "a stage is dead or stuck"}})
    def healthz() -> JSONResponse:
        """Liveness: the process answers and every stage's loop turns (restart it if not)."""
        got = liveness() if liveness is not None else {}
        ok = all(got.values())
        return JSONResponse({"status": "ok" if ok else "stuck", "checks": got},
                            status_code=200 if ok else 503)

    @probes.get("/readyz", responses={503: {"description": "not ready"}})
    def readyz() -> JSONResponse:
        """Readiness: reference loaded, each Kafka stage's consumer group joined (once, even
        with no partition to own), Redis answering (API)."""
        got = checks()
        ok = all(got.values())
        return JSONResponse({"ready": ok, "checks": got}, status_code=200 if ok else 503)

    @probes.get("/metrics", response_class=Response)
    def metrics() -> Response:
        """Prometheus exposition of this process's registry."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(probes)
    if ctx is not None and settings is not None:
        templates = {getattr(r, "endpoint", None): getattr(r, "path", "") for r in probes.routes}
        for module in (incidents, slices, similar, gap, versions, references):
            app.include_router(module.router, prefix=API_PREFIX,
                               dependencies=[Depends(strict_query), Depends(json_body)])
            templates.update({getattr(r, "endpoint", None): API_PREFIX + getattr(r, "path", "")
                              for r in module.router.routes})
        app.state.query_names = _query_names(app, templates)
        install_error_handlers(app)
        app.add_middleware(Observe, metrics=ApiMetrics(registry), routes=templates)
        app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
        app.router.add_event_handler("shutdown", ctx.close)
    return app


def _query_names(app: FastAPI, templates: dict[Any, str]) -> dict[Any, frozenset[str]]:
    """Endpoint → the query parameter names its OpenAPI operation declares."""
    paths = app.openapi()["paths"]
    out = {}
    for endpoint, path in templates.items():
        ops = paths.get(path, {})
        out[endpoint] = frozenset(p["name"] for op in ops.values() if isinstance(op, dict)
                                  for p in op.get("parameters", []) if p.get("in") == "query")
    return out


def _readiness(readiness: Readiness | None, ctx: ServiceContext | None) -> Readiness:
    def checks() -> dict[str, bool]:
        out = dict(readiness()) if readiness is not None else {}
        if ctx is not None:
            try:
                out["redis"] = bool(ctx.redis.ping())
            except redis.RedisError:
                out["redis"] = False
            if ctx.settings.reference_dir is not None:  # configured, so it must load
                out["reference"] = ctx.reference() is not None
        return out
    return checks


def serve(settings: Settings, registry: CollectorRegistry | None = None,
          readiness: Readiness | None = None, port: int | None = None) -> None:
    """Run the triage API under uvicorn until SIGTERM/SIGINT (``driftline serve``)."""
    import uvicorn

    from driftline.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format.value)
    app = create_app(registry or CollectorRegistry(), readiness, settings)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port if port is None else port,
                log_level="warning", timeout_graceful_shutdown=10)
