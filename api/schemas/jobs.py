"""Job bodies: ``JobPublic`` (one job), ``JobsPublic`` (a page), and their parts.

``JobCreate`` (the POST body) is ``simmim_service.spec.JobCreate``: the CLI and the embedded
mode validate the same model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobstore.models import Attempt, Job
from jobstore.states import JobStatus
from simmim_service.spec import TrainingSpec


class Progress(BaseModel):
    """What the worker last reported; every key is optional and workers may add more."""

    model_config = ConfigDict(extra="allow")

    step: int | None = Field(default=None, description="Optimizer steps done")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned")
    epoch: float | None = Field(default=None, description="Current epoch (fractional)")
    images_per_sec: float | None = Field(default=None, description="Training throughput")
    data_wait_fraction: float | None = Field(default=None, description="Share of time spent waiting for data")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds until done")
    loss: float | None = Field(default=None, description="Latest (smoothed) training loss")
    lr: float | None = Field(default=None, description="Current learning rate")


class JobErrorPublic(BaseModel):
    """Why a job failed; ``code`` is one of ``jobstore.states.ErrorCode``."""

    code: str = Field(examples=["data_error"])
    message: str | None


class AttemptPublic(BaseModel):
    """One try at running the job."""

    number: int
    worker: str | None
    started_at: datetime
    ended_at: datetime | None
    reason: str | None = Field(description="How it ended: succeeded, failed, cancelled, worker_lost, an error code")

    @classmethod
    def from_record(cls, row: Attempt) -> AttemptPublic:
        return cls(number=row.number, worker=row.worker, started_at=row.started_at, ended_at=row.ended_at,
                   reason=row.reason)


class JobPublic(BaseModel):
    """A pretraining job as the API shows it. Times are UTC ISO 8601."""

    id: str = Field(examples=["job_01jq3v5n6xa7k2m9p4r8t0w3yz"])
    name: str | None
    status: JobStatus
    dataset: str
    training: TrainingSpec = Field(description="The resolved training spec, defaults filled in")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Training settings the service changed to keep the job running, e.g. a smaller "
                    "batch_size with more accumulation_steps (same total batch) after running out of memory")
    metadata: dict[str, Any]
    progress: Progress
    latest_metrics: dict[str, float] = Field(description="Last value of every metric, plus its step")
    error: JobErrorPublic | None
    attempt: int = Field(description="Number of the current (or last) attempt; 0 before the first")
    attempts: list[AttemptPublic]
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_record(cls, job: Job, attempts: list[Attempt]) -> JobPublic:
        error = JobErrorPublic(code=job.error_code, message=job.error_message) if job.error_code else None
        return cls(
            id=job.id, name=job.name, status=JobStatus(job.status), dataset=job.spec.get("dataset", ""),
            training=_training(job.spec.get("training", {})), overrides=job.overrides or {},
            metadata=job.meta or {},
            progress=Progress.model_validate(job.progress or {}), latest_metrics=job.latest_metrics or {},
            error=error, attempt=job.attempt, attempts=[AttemptPublic.from_record(a) for a in attempts],
            cancel_requested=job.cancel_requested, created_at=job.created_at, updated_at=job.updated_at,
            started_at=job.started_at, finished_at=job.finished_at,
        )


def _training(stored: dict[str, Any]) -> TrainingSpec:
    """The stored spec; one written under an older schema is shown as stored rather than failing."""
    try:
        return TrainingSpec.model_validate(stored)
    except ValidationError:
        return TrainingSpec.model_construct(**stored)


class JobsPublic(BaseModel):
    """One page of jobs, newest first; pass ``next_after`` as ``after`` to get the next page."""

    data: list[JobPublic]
    has_more: bool
    next_after: str | None = Field(description="Cursor for the next page; null on the last page")


class MetricPointPublic(BaseModel):
    key: str
    value: float
    step: int
    timestamp: datetime


class MetricHistory(BaseModel):
    """One metric by step, evenly thinned to at most ``max_points`` (the last point is kept)."""

    key: str
    points: list[MetricPointPublic]


class MetricKeys(BaseModel):
    """The metrics a job has reported so far (ask for one with ``?key=``)."""

    keys: list[str]
