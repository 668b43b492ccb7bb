"""Per-process connections of a worker: the job store and the artifact store.

Celery's prefork pool forks its children from the parent, and database connections must
not cross a fork, so each process builds its own on first use (keyed by process id).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobstore.db import make_engine, session_factory
from simmim_service.artifacts import ArtifactStore
from simmim_service.settings import Settings


@dataclass
class WorkerContext:
    """What a task needs besides its arguments."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One committed transaction (rolled back if the block raises)."""
        with self.sessions.begin() as session:
            yield session


_contexts: dict[tuple[int, int], WorkerContext] = {}
_lock = threading.Lock()


def context_for(settings: Settings) -> WorkerContext:
    """The context of this process for ``settings``, created on first use."""
    key = (os.getpid(), id(settings))
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            engine = make_engine(settings.database_url)
            store = ArtifactStore(settings.artifact_root, settings.artifact_storage_options)
            ctx = WorkerContext(settings, engine, session_factory(engine), store)
            _contexts[key] = ctx
        return ctx
