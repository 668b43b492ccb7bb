"""Liveness and readiness bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Each dependency and whether it answered."""

    status: Literal["ready"] = "ready"
    checks: dict[str, str]
