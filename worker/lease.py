"""The lease of one training attempt: heart-beats, cancel polling and progress writes.

A background thread renews the lease every ``lease_seconds / 4`` so slow steps never let
it expire; the training loop asks :meth:`JobLease.should_stop` after every step, which
reads the cancel flag from the store at most every ``poll_s`` seconds.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobstore import repo
from jobstore.repo import StaleAttemptError
from jobstore.states import JobStatus
from worker.context import WorkerContext

if TYPE_CHECKING:
    from simmim.engine import Progress

log = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "lr", "images_per_sec", "data_wait_fraction")


class JobLease:
    """Keeps attempt ``attempt`` of ``job_id`` alive and tells training when to stop."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt: int, *,
                 shutdown: Callable[[], bool], poll_s: float = 0.5) -> None:
        self.ctx, self.job_id, self.attempt = ctx, job_id, attempt
        self.shutdown = shutdown
        self.poll_s = poll_s
        self.interval_s = ctx.settings.lease_seconds / 4
        self._cancel = threading.Event()
        self._stale = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)
        self._last_poll = 0.0
        self._cancel_seen_at: float | None = None

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def note_cancel(self, requested: bool) -> None:
        """Record the cancel flag returned by a fenced write."""
        if requested:
            self._cancel.set()

    def should_stop(self) -> bool:
        """True when the job was cancelled or the worker is shutting down.

        Raises:
            StaleAttemptError: Another attempt owns the job; stop without checkpointing.
        """
        if self._stale.is_set():
            raise StaleAttemptError(f"job {self.job_id}: attempt {self.attempt} lost its lease")
        if self._cancel.is_set() or self.shutdown():
            return True
        now = time.monotonic()
        if now - self._last_poll >= self.poll_s:
            self._last_poll = now
            self.note_cancel(self._read_cancel())
        return self._cancel.is_set()

    def _read_cancel(self) -> bool:
        try:
            with self.ctx.sessions() as session:
                job = repo.get_job(session, job_id=self.job_id)
                attempt, cancel = job.attempt, bool(job.cancel_requested)
        except Exception:  # a store hiccup must not kill training; the next poll retries
            log.warning("reading the cancel flag of job %s failed", self.job_id, exc_info=True)
            return False
        if attempt != self.attempt:
            raise StaleAttemptError(f"job {self.job_id}: attempt {self.attempt} was superseded by {attempt}")
        return cancel

    def _beat(self) -> None:
        next_beat = time.monotonic() + self.interval_s
        while not self._done.wait(min(self.interval_s, 0.5)):
            if self._cancel.is_set() and self._past_cancel_grace():
                self._terminate_after_cancel()
                return
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + self.interval_s
            try:
                with self.ctx.transaction() as session:
                    self.note_cancel(repo.heartbeat(session, job_id=self.job_id, attempt=self.attempt))
            except StaleAttemptError:
                self._stale.set()
                return
            except Exception:  # the store may be briefly unreachable; the next beat retries
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def _past_cancel_grace(self) -> bool:
        now = time.monotonic()
        if self._cancel_seen_at is None:
            self._cancel_seen_at = now
        return now - self._cancel_seen_at > self.ctx.settings.cancel_grace_s

    def _terminate_after_cancel(self) -> None:
        """Training ignored the cancel for ``cancel_grace_s``: end the job and kill this process.

        The pool process is replaced by Celery; its GPU memory, loader workers and (through
        ``PR_SET_PDEATHSIG``) any data-parallel ranks go with it.
        """
        grace = self.ctx.settings.cancel_grace_s
        try:
            with self.ctx.transaction() as session:
                repo.add_event(session, job_id=self.job_id, type="log", data={
                    "message": f"training did not stop within {grace:g} s of the cancel; its process was "
                               "terminated", "level": "warning", "attempt": self.attempt})
                repo.set_status(session, job_id=self.job_id, attempt=self.attempt, status=JobStatus.CANCELLED)
        except StaleAttemptError:
            return  # a newer attempt owns the job; it is not ours to end (nor our process to keep)
        except Exception:
            log.error("could not record the cancel of job %s; terminating anyway", self.job_id, exc_info=True)
        log.warning("job %s: training ignored the cancel for %.0f s; killing pool process %d",
                    self.job_id, grace, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)


class ProgressWriter:
    """Writes engine progress to the store, at most every ``interval_s`` (first and last always)."""

    def __init__(self, ctx: WorkerContext, lease: JobLease) -> None:
        self.ctx, self.lease = ctx, lease
        self.interval_s = ctx.settings.progress_interval_s
        self._latest: Progress | None = None
        self._written: Progress | None = None
        self._written_at = -math.inf

    def __call__(self, progress: Progress) -> None:
        self._latest = progress
        if time.monotonic() - self._written_at >= self.interval_s:
            self._write(progress)

    def flush(self) -> None:
        """Write the newest report if it has not been written yet."""
        if self._latest is not None and self._latest is not self._written:
            self._write(self._latest)

    def _write(self, p: Progress) -> None:
        values = progress_values(p)
        metrics = {k: values[k] for k in METRIC_KEYS if values[k] is not None}
        try:
            with self.ctx.transaction() as session:
                cancel = repo.record_progress(session, job_id=self.lease.job_id, attempt=self.lease.attempt,
                                              progress=values, metrics=metrics, step=p.step)
        except StaleAttemptError:
            raise
        except Exception:  # a store hiccup must not kill training; the next report retries
            log.warning("writing progress of job %s failed", self.lease.job_id, exc_info=True)
            return
        self.lease.note_cancel(cancel)
        self._written, self._written_at = p, time.monotonic()


def progress_values(p: Progress) -> dict[str, Any]:
    """The JSON-safe progress dict (non-finite numbers become None: JSON has no NaN)."""
    from simmim.engine import progress_dict

    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in progress_dict(p).items()}
