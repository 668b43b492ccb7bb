"""Checkpoint listings and downloads of a tenant's job."""

from __future__ import annotations

from pathlib import PurePosixPath

from sqlalchemy.orm import Session

from api.downloads import Download
from api.errors import NotFound
from api.schemas.checkpoints import CheckpointPublic, CheckpointsPublic
from api.services.jobs import get_job
from jobstore import repo


def list_checkpoints(*, session: Session, tenant: str, job_id: str) -> CheckpointsPublic:
    get_job(session=session, tenant=tenant, job_id=job_id)
    rows = repo.list_checkpoints(session, job_id=job_id)
    return CheckpointsPublic(data=[CheckpointPublic.from_record(r) for r in rows])


def checkpoint_download(*, session: Session, tenant: str, job_id: str, checkpoint_id: str) -> Download:
    """What to stream for a checkpoint; its ``uri`` is an artifact-store key."""
    get_job(session=session, tenant=tenant, job_id=job_id)
    row = repo.get_checkpoint(session, job_id=job_id, checkpoint_id=checkpoint_id)
    if row is None:
        raise NotFound(f"job {job_id} has no checkpoint {checkpoint_id!r}; list them at "
                       f"/v1/jobs/{job_id}/checkpoints")
    return Download(key=row.uri, filename=PurePosixPath(row.uri).name, sha256=row.sha256)
