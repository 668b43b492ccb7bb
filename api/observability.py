"""Prometheus metrics on a per-app registry: requests by route template, latency, jobs by status.

Route labels are templates (``/v1/jobs/{job_id}``), never raw paths, so label cardinality
stays bounded; unmatched paths count as ``<unmatched>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.services.jobs import count_by_status
from jobstore.states import JobStatus

log = logging.getLogger("api.observability")


class JobsByStatus(Collector):
    """``simmim_jobs{status}``, counted in the job store at scrape time."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session] | None]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        factory = self.sessions()
        if factory is None:
            return
        try:
            with factory() as session:
                counts = count_by_status(session)
        except SQLAlchemyError as err:
            log.warning("could not count jobs for /metrics: %s", err)
            return
        gauge = GaugeMetricFamily("simmim_jobs", "Jobs in the store by status", labels=["status"])
        for status in JobStatus:
            gauge.add_metric([status.value], counts.get(status.value, 0))
        yield gauge


class Instruments:
    """The API's metrics, registered on their own registry (one per app, so tests stay isolated)."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session] | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("simmim_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("simmim_http_request_duration_seconds", "Time to the end of the response",
                                 ["method", "route"], registry=self.registry)
        self.registry.register(JobsByStatus(sessions))


class MetricsMiddleware:
    """Pure ASGI middleware that feeds ``Instruments`` (SSE streams count until they end)."""

    def __init__(self, app: ASGIApp, instruments: Instruments) -> None:
        self.app = app
        self.instruments = instruments

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "<unmatched>")
            method = scope["method"]
            self.instruments.requests.labels(method, route, str(status)).inc()
            self.instruments.latency.labels(method, route).observe(time.perf_counter() - started)
