"""Writes to the job store the way a worker would (through ``jobstore.repo``), for test setup."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobstore import repo
from jobstore.states import JobStatus
from simmim_service.artifacts import ArtifactStore

SPEC: dict[str, Any] = {"dataset": "/data/digits", "training": {"model": "vit_tiny_patch16_224"}}


def seed_job(sessions: sessionmaker[Session], tenant: str = "alice", status: JobStatus = JobStatus.QUEUED,
             **kwargs: Any) -> str:
    """A job moved through the real transitions to ``status``; returns its id."""
    with sessions.begin() as s:
        job, _ = repo.create_job(s, tenant=tenant, spec=SPEC, **kwargs)
        job_id = job.id
    if status in (JobStatus.QUEUED, JobStatus.CANCELLED):
        if status == JobStatus.CANCELLED:
            with sessions.begin() as s:
                repo.request_cancel(s, job_id=job_id)
        return job_id
    attempt = start(sessions, job_id)
    if status == JobStatus.VALIDATING:
        return job_id
    move(sessions, job_id, attempt, JobStatus.RUNNING)
    if status == JobStatus.FAILED:
        move(sessions, job_id, attempt, JobStatus.FAILED, error_code="data_error", error_message="bad image x.png")
    elif status != JobStatus.RUNNING:
        move(sessions, job_id, attempt, status)
    return job_id


def start(sessions: sessionmaker[Session], job_id: str, worker: str = "gpu-0") -> int:
    with sessions.begin() as s:
        attempt = repo.start_attempt(s, job_id=job_id, worker=worker)
    assert attempt is not None
    return attempt


def move(sessions: sessionmaker[Session], job_id: str, attempt: int, status: JobStatus, **kw: Any) -> None:
    with sessions.begin() as s:
        repo.set_status(s, job_id=job_id, attempt=attempt, status=status, **kw)


def report(sessions: sessionmaker[Session], job_id: str, attempt: int, step: int, **metrics: float) -> None:
    with sessions.begin() as s:
        repo.record_progress(s, job_id=job_id, attempt=attempt, metrics=metrics,
                             progress={"step": step, "total_steps": 1000, "loss": metrics.get("loss")})


def seed_checkpoint(sessions: sessionmaker[Session], artifacts: ArtifactStore, job_id: str, step: int = 100,
                    size: int = 300_000, kind: str = "checkpoint", final: bool = False) -> tuple[str, bytes]:
    """Random bytes written to the artifact store and recorded as a checkpoint; returns (id, bytes)."""
    data = os.urandom(size)
    key = f"jobs/{job_id}/checkpoints/ckpt_{step:08d}.pt"
    path = artifacts.local_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with sessions.begin() as s:
        job = repo.get_job(s, job_id=job_id)
        ckpt = repo.add_checkpoint(s, job_id=job_id, attempt=job.attempt, step=step, uri=key,
                                   sha256=hashlib.sha256(data).hexdigest(), size=size, final=final, kind=kind)
        return ckpt.id, data


def job_ids(sessions: sessionmaker[Session]) -> set[tuple[str, str, str]]:
    """(tenant, id, status) of every job in the store."""
    from sqlalchemy import select

    from jobstore.models import Job

    with sessions() as s:
        return {(j.tenant, j.id, j.status) for j in s.scalars(select(Job))}
