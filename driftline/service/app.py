"""FastAPI app factory: probes and metrics now; the triage routers mount here."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import driftline

Readiness = Callable[[], dict[str, bool]]


def create_app(registry: CollectorRegistry, readiness: Readiness | None = None) -> FastAPI:
    """Build the HTTP app. ``readiness`` returns named checks; all must be true for /readyz."""
    app = FastAPI(title="driftline", version=driftline.__version__,
                  description="Drift monitoring for vision models: triage API")

    @app.get("/healthz", tags=["probes"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], responses={503: {"description": "not ready"}})
    def readyz() -> JSONResponse:
        """Readiness: reference loaded and partitions assigned (per running stage)."""
        checks = readiness() if readiness is not None else {}
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    def metrics() -> Response:
        """Prometheus exposition of this process's registry."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
