"""Readiness: can the API reach the job store, the broker and the artifact store?"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.dispatch import Dispatcher
from simmim_service.artifacts import ArtifactStore


def readiness_checks(*, sessions: sessionmaker[Session], dispatcher: Dispatcher,
                     artifacts: ArtifactStore) -> dict[str, str]:
    """``{"database": "ok" | reason, "broker": ..., "artifacts": ...}``."""
    checks: dict[str, str] = {}
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as err:
        checks["database"] = f"unreachable: {type(err).__name__}"
    checks["broker"] = "ok" if dispatcher.ping() else "unreachable"
    checks["artifacts"] = "ok" if artifacts.ping() else "unreachable"
    return checks
