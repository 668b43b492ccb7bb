"""The reaper: finds jobs whose worker is gone and jobs whose task message was lost, and re-queues them.

A running attempt renews its lease (``heartbeat_at``) every ``lease_seconds / 4``. When a
machine dies, loses its network or freezes, nothing renews it; after ``lease_seconds`` the
reaper ends that attempt as ``worker_lost`` and puts the job back on its queue as
``recovering``. The next worker starts attempt + 1 and resumes from the last complete
checkpoint; the attempt number fences the old worker out if it ever wakes up. A job that
keeps losing its worker fails after ``max_lost_attempts``.

It also re-sends the task of jobs that have waited in ``queued``/``recovering`` for
``redispatch_after_s`` since their task was last sent: a broker that restarted without
persistence, or a send that failed, must not leave a job waiting forever. Duplicates are
harmless (a delivery for an owned or finished job does nothing).

It runs as a thread in every API process (``start``/``stop``); several replicas are safe
because rows are claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (SQLite serialises
writers). Nothing here is needed for correctness of a healthy job: the broker's visibility
timeout is never what keeps a long job alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from jobstore import repo
from simmim_service.periodic import Periodic
from simmim_service.settings import Settings

log = logging.getLogger(__name__)

Enqueue = Callable[[str, int], None]
"""Sends the training task of (job id, GPU count); raises when the broker is unreachable."""


@dataclass
class ReapReport:
    """What one pass did."""

    recovered: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    failed_to_send: list[str] = field(default_factory=list)


class Reaper(Periodic):
    """Periodic lease expiry and re-dispatch over one job store."""

    name = "simmim-reaper"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], enqueue: Enqueue) -> None:
        super().__init__()
        self.settings, self.sessions, self.enqueue = settings, sessions, enqueue
        self.interval_s = settings.reaper_interval_s

    def run_once(self) -> ReapReport:
        """One pass: expire stale leases, then re-send what has waited too long."""
        report = ReapReport()
        now = datetime.now(UTC)
        with self.sessions.begin() as session:
            report.recovered = repo.expire_stale_attempts(
                session, older_than=now - timedelta(seconds=self.settings.lease_seconds),
                max_lost=self.settings.max_lost_attempts)
            gpus = {job_id: _gpus(repo.get_job(session, job_id=job_id).spec) for job_id in report.recovered}
        for job_id in report.recovered:
            log.warning("job %s lost its worker (no heartbeat for %.0f s); re-queued as recovering",
                        job_id, self.settings.lease_seconds)
            self._send(job_id, gpus[job_id], report)
        with self.sessions.begin() as session:
            waiting = repo.jobs_to_redispatch(
                session, older_than=now - timedelta(seconds=self.settings.redispatch_after_s))
            resend = [(job.id, _gpus(job.spec)) for job in waiting if job.id not in report.recovered]
        for job_id, n in resend:
            log.info("job %s has waited %.0f s since its task was sent; sending it again",
                     job_id, self.settings.redispatch_after_s)
            if self._send(job_id, n, report):
                report.redispatched.append(job_id)
        return report

    def _send(self, job_id: str, gpus: int, report: ReapReport) -> bool:
        try:
            self.enqueue(job_id, gpus)
        except Exception as err:  # the broker is down: the next pass tries again
            log.warning("could not re-queue job %s: %s", job_id, err)
            report.failed_to_send.append(job_id)
            return False
        with self.sessions.begin() as session:
            repo.mark_dispatched(session, job_id=job_id)
        return True


def _gpus(spec: dict[str, object]) -> int:
    training = spec.get("training")
    value = training.get("gpus", 1) if isinstance(training, dict) else 1
    return value if isinstance(value, int) and value >= 1 else 1
