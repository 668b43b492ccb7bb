"""Builds the FastAPI app: settings, dispatcher, store and routers wired together, nothing else.

``uvicorn --factory api.main:app_factory`` reads ``SIMMIM_*`` settings when it starts (never
at import). The lifespan opens the job store, brings its schema up to date and runs the
reaper (lost workers and lost task messages, see ``simmim_service.reaper``) and the webhook
deliverer (``simmim_service.webhooks``). The dashboard page is served at ``/``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from api.body_limit import BodyLimitMiddleware
from api.deps import EMBED_CONCURRENCY
from api.dispatch import CeleryDispatcher, Dispatcher
from api.errors import UnexpectedErrorMiddleware, install_error_handlers, problem_responses
from api.observability import Instruments, MetricsMiddleware
from api.openapi import install_openapi
from api.rate_limit import RateLimitMiddleware
from api.routes import checkpoints, dashboard, embeddings, events, health, jobs, neighbours
from api.routes import previews as preview_routes
from jobstore.db import make_engine, migrate, session_factory
from simmim_service.artifacts import ArtifactStore
from simmim_service.reaper import Reaper
from simmim_service.settings import Settings
from simmim_service.webhooks import WebhookDeliverer

DESCRIPTION = """Self-supervised pretraining of timm image encoders with SimMIM, as a service.
Errors are RFC 9457 `application/problem+json`. Authenticate with `Authorization: Bearer <key>`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the job store (migrating it) for the app's lifetime."""
    settings: Settings = app.state.settings
    engine = make_engine(settings.database_url)
    await anyio.to_thread.run_sync(migrate, engine)
    app.state.sessions = session_factory(engine)
    app.state.embed_slots = anyio.CapacityLimiter(EMBED_CONCURRENCY)
    reaper = Reaper(settings, app.state.sessions, app.state.dispatcher.enqueue_pretrain)
    reaper.start()
    webhooks = WebhookDeliverer(settings, app.state.sessions)  # signed POSTs of terminal events
    webhooks.start()
    try:
        yield
    finally:
        webhooks.stop()
        reaper.stop()
        app.state.sessions = None
        engine.dispose()
        if isinstance(app.state.dispatcher, CeleryDispatcher) and app.state.owns_dispatcher:
            app.state.dispatcher.close()


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment) and ``dispatcher`` (default: Celery)."""
    settings = settings or Settings()
    app = FastAPI(title="SimMIM pretraining service", version="1.0.0", description=DESCRIPTION,
                  lifespan=lifespan, responses=problem_responses(500))
    app.state.settings = settings
    app.state.owns_dispatcher = dispatcher is None
    app.state.dispatcher = dispatcher or CeleryDispatcher(settings)
    app.state.artifacts = ArtifactStore(settings.artifact_root, settings.artifact_storage_options)
    app.state.sessions = None
    app.state.instruments = Instruments(lambda: app.state.sessions)
    for module in (jobs, events, checkpoints, embeddings, neighbours, health, dashboard):
        app.include_router(module.router)
    app.include_router(preview_routes.router)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(UnexpectedErrorMiddleware)  # innermost: a 500 keeps the connection
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_embed_bytes + (1 << 20))
    app.add_middleware(RateLimitMiddleware, settings=settings)  # before the body is read
    app.add_middleware(MetricsMiddleware, instruments=app.state.instruments)
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory api.main:app_factory``: settings from ``SIMMIM_*`` variables."""
    return create_app()
