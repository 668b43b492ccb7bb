"""Typed dependencies. Everything comes from ``app.state`` (set by ``create_app`` and its
lifespan), so tests replace pieces with ``app.dependency_overrides`` or ``create_app`` args.

The plain getters are ``async`` so that they run on the event loop instead of a thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from anyio import CapacityLimiter
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from api.auth import current_tenant
from api.dispatch import Dispatcher
from simmim_service.artifacts import ArtifactStore
from simmim_service.settings import Settings


@dataclass(frozen=True)
class StreamTiming:
    """How often the event stream polls the store, and how often it sends a keep-alive."""

    poll_s: float = 0.5
    keepalive_s: float = 15.0


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_sessions(request: Request) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    return sessions


def get_session(request: Request) -> Iterator[Session]:
    """One session per route call; routes commit what they write, anything else is rolled back.

    Closed as soon as the route function returns (``scope="function"``), so a streamed
    download or event stream holds no database connection while it runs.
    """
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        yield session


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def get_artifacts(request: Request) -> ArtifactStore:
    artifacts: ArtifactStore = request.app.state.artifacts
    return artifacts


EMBED_CONCURRENCY = 16
"""Synchronous embedding requests waiting on workers at once, per API process; more queue up."""


async def get_embed_slots(request: Request) -> CapacityLimiter:
    """The thread limiter of ``POST /v1/jobs/{id}/embeddings`` (made by the lifespan)."""
    slots: CapacityLimiter = request.app.state.embed_slots
    return slots


async def get_stream_timing() -> StreamTiming:
    return StreamTiming()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
TenantDep = Annotated[str, Depends(current_tenant)]
EmbedSlotsDep = Annotated[CapacityLimiter, Depends(get_embed_slots)]
StreamTimingDep = Annotated[StreamTiming, Depends(get_stream_timing)]
