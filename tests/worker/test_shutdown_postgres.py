"""On PostgreSQL: a worker asked to shut down hands its job back, and another worker finishes it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobstore import repo
from jobstore.states import JobStatus
from tests.services import postgres_database, redis_server
from tests.worker.stack import Stack, celery_worker, make_stack


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("pg")
    with postgres_database() as url, redis_server(workdir) as redis_url:
        stack = make_stack(workdir, url, redis_url)
        yield stack
        stack.close()


def test_sigterm_checkpoints_requeues_and_another_worker_resumes(pg_stack: Stack, digits: dict[str, Path]) -> None:
    stack = pg_stack
    job_id = stack.create_job(digits["train"], max_steps=24, checkpoint_every=100)
    with celery_worker(stack, "pg1") as proc:
        stack.submit(job_id)
        stack.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 3)
        proc.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - asked < 30
    job = stack.job(job_id)
    assert job.status == JobStatus.RECOVERING, (job.status, stack.worker_logs())
    stopped_at = job.progress["step"]
    assert 3 <= stopped_at < 24
    (ckpt,) = stack.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    assert ckpt.step == stopped_at and not ckpt.final

    with celery_worker(stack, "pg2"):  # the re-queued task is waiting in Redis
        job = stack.wait_for(job_id, lambda j: j.status == JobStatus.SUCCEEDED, timeout=120)
    assert job.progress["step"] == 24 and job.attempt == 2 and job.worker and job.worker.startswith("pg2@")
    events = stack.read(lambda s: repo.list_events(s, job_id=job_id))
    statuses = [e.data["status"] for e in events if e.type == "status"]
    assert statuses == ["queued", "validating", "running", "recovering", "validating", "running", "succeeded"]
    logs = [e.data["message"] for e in events if e.type == "log"]
    assert f"resuming from the checkpoint at step {stopped_at}" in logs
    assert any(m.startswith("worker shutting down") for m in logs)
    losses = stack.read(lambda s: repo.metric_history(s, job_id=job_id, key="loss"))
    assert [p.step for p in losses] == sorted({p.step for p in losses})  # no step trained twice
