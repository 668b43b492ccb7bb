"""Job states and the transitions between them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    VALIDATING = "validating"
    RUNNING = "running"
    CANCELLING = "cancelling"
    RECOVERING = "recovering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ErrorCode(StrEnum):
    INVALID_SPEC = "invalid_spec"
    DATA_ERROR = "data_error"
    OOM = "oom"
    WORKER_LOST = "worker_lost"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.VALIDATING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.VALIDATING: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLING,
                                     JobStatus.CANCELLED, JobStatus.RECOVERING}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLING,
                                  JobStatus.CANCELLED, JobStatus.RECOVERING}),
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUCCEEDED}),
    JobStatus.RECOVERING: frozenset({JobStatus.VALIDATING, JobStatus.RUNNING, JobStatus.FAILED,
                                     JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    """Whether ``current -> target`` is a legal move."""
    return target in ALLOWED[current]
