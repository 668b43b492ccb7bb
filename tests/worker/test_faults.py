"""Faults injected into real workers: each test does the damage and checks that nothing is lost.

Real Celery worker processes on a real redis-server (append-only file on, as in
docker-compose), a PostgreSQL job store (SQLite where PostgreSQL is not available outside
CI), the reaper as the API runs it, tiny ViTs on real digits. Every test records what it
injected with ``record_property`` so ``bench/faults.py`` can report it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobstore import repo
from jobstore.states import JobStatus
from simmim.checkpoint import CheckpointManager
from simmim_service.reaper import Reaper
from tests.services import alive, free_port, postgres_database, unavailable
from tests.worker.stack import Stack, celery_worker, make_stack
from worker.claim import parse_identity

pytestmark = pytest.mark.slow

Record = Callable[[str, Any], None]


class RestartableRedis:
    """A redis-server on a fixed port that can be stopped and started again, keeping its data."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            unavailable("redis-server is not installed")
        self.workdir, self.port = workdir, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        with postgres_database() as url:
            yield url
    except pytest.skip.Exception:
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'jobs.db'}"


@pytest.fixture
def stack(tmp_path: Path, database_url: str, redis: RestartableRedis) -> Iterator[Stack]:
    stack = make_stack(tmp_path, database_url, redis.url)
    stack.settings = stack.settings.model_copy(update={
        "lease_seconds": 5.0, "reaper_interval_s": 0.5, "redispatch_after_s": 2.0, "cancel_grace_s": 2.0,
        "progress_interval_s": 0.0})
    yield stack
    stack.close()


@pytest.fixture
def reaper(stack: Stack) -> Iterator[Reaper]:
    """The API's reaper, re-queuing through the same Celery app the tests send with."""
    r = Reaper(stack.settings, stack.sessions, lambda job_id, gpus: stack.submit(job_id, gpus))
    r.start()
    yield r
    r.stop()


def events_of(stack: Stack, job_id: str) -> list[Any]:
    return stack.read(lambda s: repo.list_events(s, job_id=job_id, limit=100000))


def logs(stack: Stack, job_id: str) -> list[str]:
    return [e.data["message"] for e in events_of(stack, job_id) if e.type == "log"]


def assert_attempts_never_overlapped(stack: Stack, job_id: str) -> None:
    """Every event an attempt wrote comes after every event of the attempts before it."""
    numbered = [(e.id, e.data["attempt"]) for e in events_of(stack, job_id) if "attempt" in e.data]
    attempts = [a for _, a in sorted(numbered)]
    assert attempts == sorted(attempts), attempts
    rows = stack.read(lambda s: repo.list_attempts(s, job_id=job_id))
    for earlier, later in itertools.pairwise(rows):
        assert earlier.ended_at is not None and earlier.ended_at <= later.started_at


def assert_complete(stack: Stack, job_id: str, steps: int) -> None:
    """Succeeded with exactly ``steps`` steps, every recorded file present and intact."""
    job = stack.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, (job.status, job.error_message, stack.worker_logs())
    assert job.progress["step"] == job.progress["total_steps"] == steps
    records = stack.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    assert {r.kind for r in records} == {"checkpoint", "encoder"}
    manager = CheckpointManager(stack.artifacts / "jobs" / job_id / "checkpoints")
    for info in manager.list():
        manager.verify(info)
    assert max(r.step for r in records) == steps


def test_sigkilled_worker_is_replaced_and_the_job_resumes_from_its_last_checkpoint(
        stack: Stack, reaper: Reaper, digits: dict[str, Path], record_property: Record) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    record_property("jobs", 1)
    job_id = stack.create_job(digits["train"], max_steps=40, checkpoint_every=5)
    with celery_worker(stack, "doomed") as doomed:
        stack.submit(job_id)
        stack.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 12, timeout=120)
        os.killpg(doomed.pid, signal.SIGKILL)  # the machine dies: main process and pool together
        doomed.wait()
    lost_at = stack.job(job_id).progress["step"]
    stack.wait_for(job_id, lambda j: j.status == JobStatus.RECOVERING, timeout=30)
    with celery_worker(stack, "rescuer"):
        stack.wait_for(job_id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=180)
    assert_complete(stack, job_id, 40)
    attempts = stack.read(lambda s: repo.list_attempts(s, job_id=job_id))
    assert [(a.number, a.reason) for a in attempts] == [(1, "worker_lost"), (2, "succeeded")]
    assert attempts[0].worker.startswith("doomed@") and attempts[1].worker.startswith("rescuer@")
    resumed = [m for m in logs(stack, job_id) if m.startswith("resuming from the checkpoint at step")]
    (resumed_step,) = [int(m.rsplit(" ", 1)[1]) for m in resumed]
    assert resumed_step % 5 == 0 and lost_at - 5 <= resumed_step <= lost_at
    assert_attempts_never_overlapped(stack, job_id)


def test_redis_restart_mid_job_loses_no_job(stack: Stack, reaper: Reaper, redis: RestartableRedis,
                                            digits: dict[str, Path], record_property: Record) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    record_property("jobs", 2)
    running = stack.create_job(digits["train"], max_steps=30, checkpoint_every=10)
    with celery_worker(stack, "w"):
        stack.submit(running)
        stack.wait_for(running, lambda j: j.progress.get("step", 0) >= 3, timeout=120)
        redis.stop()
        # Submitted while the broker is down: saved, never sent (the API answered 503).
        waiting = stack.create_job(digits["train"], max_steps=5)
        time.sleep(3)
        redis.start()
        for job_id, steps in ((running, 30), (waiting, 5)):
            stack.wait_for(job_id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=180)
            assert_complete(stack, job_id, steps)
    assert [a.reason for a in stack.read(lambda s: repo.list_attempts(s, job_id=running))] == ["succeeded"]


def test_killed_during_a_checkpoint_write_resumes_from_the_previous_complete_one(
        stack: Stack, digits: dict[str, Path], tmp_path: Path, record_property: Record) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    record_property("jobs", 1)
    faults = {"die_in_checkpoint_at_step": 8, "once_dir": str(tmp_path / "once")}
    job_id = stack.create_job(digits["train"], max_steps=12, checkpoint_every=4)
    with celery_worker(stack, "w", env={"SIMMIM_FAULTS": json.dumps(faults)}):
        stack.submit(job_id)
        stack.wait_for(job_id, lambda j: j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED), timeout=180)
    assert (tmp_path / "once" / f"{job_id}.die").exists()  # the fault really fired
    assert_complete(stack, job_id, 12)
    assert "resuming from the checkpoint at step 4" in logs(stack, job_id)
    attempts = stack.read(lambda s: repo.list_attempts(s, job_id=job_id))
    assert [a.reason for a in attempts] == ["worker_lost", "succeeded"]
    assert_attempts_never_overlapped(stack, job_id)


def test_out_of_memory_backs_off_to_smaller_micro_batches_with_the_same_total(
        stack: Stack, digits: dict[str, Path], record_property: Record) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 5)  # two back-offs, then three (4, 2, 1) on the hopeless job
    record_property("jobs", 2)
    job_id = stack.create_job(digits["train"], batch_size=16, max_steps=6, checkpoint_every=2)
    hopeless = stack.create_job(digits["train"], batch_size=4, max_steps=6)
    with celery_worker(stack, "w", env={"SIMMIM_FAULTS": json.dumps({"oom_above_batch": 4})}):
        assert stack.submit(job_id).get(timeout=180) == "succeeded"
    with celery_worker(stack, "w2", env={"SIMMIM_FAULTS": json.dumps({"oom_above_batch": 0})}):
        assert stack.submit(hopeless).get(timeout=180) == "failed"

    assert_complete(stack, job_id, 6)
    job = stack.job(job_id)
    assert job.overrides == {"batch_size": 4, "accumulation_steps": 4, "reason": "out of memory"}
    backoffs = [m for m in logs(stack, job_id) if m.startswith("out of memory")]
    assert len(backoffs) == 2 and "micro-batch 8 x 2" in backoffs[0] and "micro-batch 4 x 4" in backoffs[1]

    failed = stack.job(hopeless)
    assert failed.error_code == "oom"
    assert "micro-batch of 1" in failed.error_message and "4x1, 2x2, 1x4" in failed.error_message


def test_cancel_ignored_by_a_hung_process_terminates_it_after_the_grace_period(
        stack: Stack, digits: dict[str, Path], tmp_path: Path, record_property: Record) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    record_property("jobs", 2)
    faults = {"hang_at_step": 3, "once_dir": str(tmp_path / "once")}
    job_id = stack.create_job(digits["train"], max_steps=1000, checkpoint_every=1000)
    with celery_worker(stack, "w", env={"SIMMIM_FAULTS": json.dumps(faults)}):
        stack.submit(job_id)
        stack.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 3, timeout=120)
        _, pid = parse_identity(stack.job(job_id).worker or "")
        assert pid is not None
        time.sleep(1)  # it is hung now: no step after 3
        assert stack.job(job_id).progress["step"] == 3
        with stack.sessions.begin() as s:
            repo.request_cancel(s, job_id=job_id)
        asked = time.monotonic()
        job = stack.wait_for(job_id, lambda j: j.status == JobStatus.CANCELLED, timeout=30)
        took = time.monotonic() - asked
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid), "the hung pool process is still alive"
        # The worker replaced its pool process and takes the next job.
        next_job = stack.create_job(digits["train"], max_steps=2)
        assert stack.submit(next_job).get(timeout=120) == "succeeded"
    assert 2.0 <= took < 15, took
    assert job.progress["step"] == 3
    assert any("did not stop within 2 s of the cancel" in m for m in logs(stack, job_id))
