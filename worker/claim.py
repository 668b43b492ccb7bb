"""Claiming a job for a new attempt, including fast takeover from a crashed pool process.

``repo.start_attempt`` refuses a job whose lease is still fresh, so a re-delivered task
never trains a job twice. When the lease holder was a process of *this same* Celery node
that no longer exists (the pool child was OOM-killed and Celery re-queued the task), the
lease is provably stale and we take the job over at once instead of waiting for expiry.
"""

from __future__ import annotations

import os

from jobstore import repo
from jobstore.models import Attempt, Checkpoint
from jobstore.states import TERMINAL, JobStatus
from worker.context import WorkerContext

CRASH_LOOP_ATTEMPTS = 3
"""Lost attempts in a row without a single new checkpoint before a job is failed."""


def worker_identity(node_name: str, pid: int | None = None) -> str:
    """``node@host[pid]``: the Celery node and the pool process running the attempt."""
    return f"{node_name}[{pid if pid is not None else os.getpid()}]"


def parse_identity(identity: str) -> tuple[str, int | None]:
    """(node name, pid) of a :func:`worker_identity` string; pid None if there is none."""
    node, sep, rest = identity.rpartition("[")
    if not sep or not rest.endswith("]") or not rest[:-1].isdigit():
        return identity, None
    return node, int(rest[:-1])


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_dead(holder: str | None, me: str) -> bool:
    """Whether the lease holder was another, now vanished, process of my own node.

    Node names are unique per host (Celery's ``-n name@%h``), so a matching name means the
    same machine, where a missing pid is certain death.
    """
    if holder is None:
        return False
    name, pid = parse_identity(holder)
    my_name, my_pid = parse_identity(me)
    return name == my_name and pid is not None and pid != my_pid and not _process_exists(pid)


def claim(ctx: WorkerContext, job_id: str, me: str) -> int | None:
    """Start a new attempt of ``job_id``; None when it is finished or owned by a live attempt."""
    lease = ctx.settings.lease_seconds
    with ctx.transaction() as session:
        attempt = repo.start_attempt(session, job_id=job_id, worker=me, lease_seconds=lease)
    if attempt is not None:
        return attempt
    with ctx.transaction() as session:
        job = repo.get_job(session, job_id=job_id)
        if JobStatus(job.status) in TERMINAL or not holder_is_dead(job.worker, me):
            return None
        return repo.start_attempt(session, job_id=job_id, worker=me, lease_seconds=0)


def is_crash_looping(ctx: WorkerContext, job_id: str) -> bool:
    """Whether the last :data:`CRASH_LOOP_ATTEMPTS` attempts died without recording a checkpoint."""
    with ctx.sessions() as session:
        attempts = repo.list_attempts(session, job_id=job_id)
        checkpoints = repo.list_checkpoints(session, job_id=job_id)
    ended = [a for a in attempts if a.ended_at is not None]
    recent = ended[-CRASH_LOOP_ATTEMPTS:]
    if len(recent) < CRASH_LOOP_ATTEMPTS:
        return False
    return all(a.reason == "worker_lost" and not _checkpointed_during(a, checkpoints) for a in recent)


def _checkpointed_during(attempt: Attempt, checkpoints: list[Checkpoint]) -> bool:
    end = attempt.ended_at
    return end is not None and any(attempt.started_at <= c.created_at <= end for c in checkpoints)
