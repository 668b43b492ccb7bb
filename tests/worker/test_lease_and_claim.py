"""Leases, progress throttling, claiming and crash-loop detection against a real SQLite store."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobstore import repo
from jobstore.db import migrate
from jobstore.repo import StaleAttemptError
from jobstore.states import JobStatus
from simmim.engine import Progress
from simmim_service.settings import Settings
from worker.claim import claim, holder_is_dead, is_crash_looping, parse_identity, worker_identity
from worker.context import WorkerContext, context_for
from worker.lease import JobLease, ProgressWriter


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[WorkerContext]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", artifact_root=str(tmp_path / "a"),
                        work_dir=str(tmp_path / "w"), progress_interval_s=60.0, lease_seconds=30.0)
    context = context_for(settings)
    migrate(context.engine)
    yield context
    context.engine.dispose()


def _job(ctx: WorkerContext) -> str:
    with ctx.transaction() as s:
        return repo.create_job(s, tenant="t", spec={"dataset": "/x"})[0].id


def _progress(step: int) -> Progress:
    return Progress(step, 10, 0, 1.0 / step, 1e-3, 100.0, 0.1, float("nan"), 0)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_identity_round_trip_and_dead_holder_detection() -> None:
    me = worker_identity("train-gpu0@host")
    assert parse_identity(me)[0] == "train-gpu0@host"
    assert parse_identity("no-pid-here") == ("no-pid-here", None)
    dead = worker_identity("train-gpu0@host", _dead_pid())
    assert holder_is_dead(dead, me)
    assert not holder_is_dead(worker_identity("train-gpu1@host", _dead_pid()), me)  # other node: unknown
    assert not holder_is_dead(worker_identity("train-gpu0@host", 1), me)  # pid 1 is alive
    assert not holder_is_dead(None, me)


def test_claim_refuses_a_live_lease_but_takes_over_from_a_dead_process(ctx: WorkerContext) -> None:
    job_id = _job(ctx)
    first = worker_identity("w@h", _dead_pid())
    assert claim(ctx, job_id, first) == 1
    assert claim(ctx, job_id, worker_identity("other@h")) is None  # fresh lease, other node
    assert claim(ctx, job_id, worker_identity("w@h")) == 2  # same node, holder process gone
    with ctx.transaction() as s:
        repo.set_status(s, job_id=job_id, attempt=2, status=JobStatus.FAILED, error_code="internal")
    assert claim(ctx, job_id, worker_identity("w@h", _dead_pid())) is None  # finished: never again


def test_three_lost_attempts_without_a_checkpoint_are_a_crash_loop(ctx: WorkerContext) -> None:
    job_id = _job(ctx)
    for attempt in range(1, 4):
        with ctx.transaction() as s:
            assert repo.start_attempt(s, job_id=job_id, worker="w", lease_seconds=0) == attempt
        assert not is_crash_looping(ctx, job_id)
        if attempt == 1:
            with ctx.transaction() as s:
                repo.add_checkpoint(s, job_id=job_id, attempt=1, step=4, uri="k", sha256="0" * 64, size=1)
    with ctx.transaction() as s:
        repo.start_attempt(s, job_id=job_id, worker="w", lease_seconds=0)
    assert not is_crash_looping(ctx, job_id)  # attempt 1 wrote a checkpoint
    with ctx.transaction() as s:
        repo.start_attempt(s, job_id=job_id, worker="w", lease_seconds=0)
    assert is_crash_looping(ctx, job_id)  # attempts 2, 3, 4 died with nothing to show


def test_progress_is_throttled_but_first_and_last_are_written(ctx: WorkerContext) -> None:
    job_id = _job(ctx)
    assert claim(ctx, job_id, "w[1]") == 1
    lease = JobLease(ctx, job_id, 1, shutdown=lambda: False)
    writer = ProgressWriter(ctx, lease)
    for step in (1, 2, 3):
        writer(_progress(step))
    writer.flush()
    writer.flush()
    with ctx.sessions() as s:
        history = repo.metric_history(s, job_id=job_id, key="loss")
        assert [p.step for p in history] == [1, 3]
        job = repo.get_job(s, job_id=job_id)
        assert job.progress["step"] == 3 and job.progress["eta_seconds"] is None  # NaN is not JSON
        assert set(job.latest_metrics) == {"loss", "lr", "images_per_sec", "data_wait_fraction", "step"}


def test_lease_sees_cancel_and_loss_of_ownership(ctx: WorkerContext) -> None:
    job_id = _job(ctx)
    assert claim(ctx, job_id, "w[1]") == 1
    shutting_down = False
    lease = JobLease(ctx, job_id, 1, shutdown=lambda: shutting_down, poll_s=0.0)
    assert not lease.should_stop()
    shutting_down = True
    assert lease.should_stop() and not lease.cancel_requested
    shutting_down = False
    with ctx.transaction() as s:
        repo.request_cancel(s, job_id=job_id)
    assert lease.should_stop() and lease.cancel_requested

    other = _job(ctx)
    assert claim(ctx, other, "w[1]") == 1
    superseded = JobLease(ctx, other, 1, shutdown=lambda: False, poll_s=0.0)
    with ctx.transaction() as s:
        assert repo.start_attempt(s, job_id=other, worker="w[2]", lease_seconds=0) == 2
    with pytest.raises(StaleAttemptError):
        superseded.should_stop()


def test_heartbeat_thread_renews_the_lease(ctx: WorkerContext) -> None:
    job_id = _job(ctx)
    assert claim(ctx, job_id, "w[1]") == 1
    with ctx.sessions() as s:
        before = repo.get_job(s, job_id=job_id).heartbeat_at
    lease = JobLease(ctx, job_id, 1, shutdown=lambda: False)
    lease.interval_s = 0.05
    with lease:
        time.sleep(0.3)
    with ctx.sessions() as s:
        after = repo.get_job(s, job_id=job_id).heartbeat_at
    assert before is not None and after is not None and after > before
