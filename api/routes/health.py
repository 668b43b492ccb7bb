"""``/healthz`` (alive), ``/readyz`` (dependencies answer) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ArtifactsDep, DispatcherDep, SessionsDep
from api.errors import ServiceUnavailable, problem_responses
from api.schemas.health import Health, Readiness
from api.services.health import readiness_checks

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up (no dependency is checked; answered on the event loop, never queued)."""
    return Health()


@router.get("/readyz", responses=problem_responses(503))
def readyz(sessions: SessionsDep, dispatcher: DispatcherDep, artifacts: ArtifactsDep) -> Readiness:
    """The job store, the broker and the artifact store all answer; otherwise 503 naming what failed."""
    checks = readiness_checks(sessions=sessions, dispatcher=dispatcher, artifacts=artifacts)
    failed = sorted(name for name, result in checks.items() if result != "ok")
    if failed:
        raise ServiceUnavailable(f"not ready: {', '.join(f'{n} ({checks[n]})' for n in failed)}", checks=checks)
    return Readiness(checks=checks)


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    """Request counts and latencies by route, and jobs by status."""
    return Response(generate_latest(request.app.state.instruments.registry), media_type=CONTENT_TYPE_LATEST)
