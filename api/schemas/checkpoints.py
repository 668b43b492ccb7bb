"""Checkpoint listings: each item links to its streamed content."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from jobstore.models import Checkpoint


class CheckpointPublic(BaseModel):
    """A complete artifact of a job: a training checkpoint or the exported encoder."""

    id: str = Field(examples=["ckpt_01jq3v5n6xa7k2m9p4r8t0w3yz"])
    step: int
    kind: str = Field(description="'checkpoint' (resumable training state) or 'encoder' (exported weights)")
    final: bool
    sha256: str = Field(description="Hex sha256 of the content; also its ETag")
    size: int = Field(description="Bytes")
    created_at: datetime
    download_url: str = Field(description="Path of the content (supports Range and If-None-Match)")

    @classmethod
    def from_record(cls, row: Checkpoint) -> CheckpointPublic:
        return cls(id=row.id, step=row.step, kind=row.kind, final=row.final, sha256=row.sha256,
                   size=row.size, created_at=row.created_at,
                   download_url=f"/v1/jobs/{row.job_id}/checkpoints/{row.id}/content")


class CheckpointsPublic(BaseModel):
    """Every recorded checkpoint of a job, by step."""

    data: list[CheckpointPublic]
