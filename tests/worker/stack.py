"""A real worker stack for tests: job store, artifact root, Redis and Celery worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repo
from jobstore.db import make_engine, migrate, session_factory
from jobstore.models import Job
from simmim_service.settings import Settings
from simmim_service.spec import JobCreate, TrainingSpec
from worker.celery_app import PRETRAIN_TASK, SimMIMCelery, make_celery, train_queue
from worker.cli import settings_env

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

TINY_TRAINING: dict[str, Any] = {
    "model": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4, "mask_patch_size": 8,
    "model_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3}, "batch_size": 16, "base_lr": 5e-2,
    "max_steps": 10, "warmup_steps": 2, "checkpoint_every": 4, "num_workers": 0,
}


@dataclass
class Stack:
    """Everything a test needs to submit jobs to real workers and inspect the outcome."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    app: SimMIMCelery
    workdir: Path

    def close(self) -> None:
        self.app.close()
        self.engine.dispose()

    @property
    def artifacts(self) -> Path:
        return self.settings.local_artifact_root()

    def create_job(self, dataset: Path | str, **training: Any) -> str:
        spec = JobCreate(dataset=str(dataset), training=TrainingSpec.model_validate({**TINY_TRAINING, **training}))
        with self.sessions.begin() as s:
            job, _ = repo.create_job(s, tenant="t", spec=spec.model_dump(mode="json"))
            return job.id

    def submit(self, job_id: str, gpus: int = 1) -> Any:
        return self.app.send_task(PRETRAIN_TASK, args=[job_id], queue=train_queue(gpus))

    def job(self, job_id: str) -> Job:
        with self.sessions() as s:
            return repo.get_job(s, job_id=job_id)

    def read(self, fn: Callable[[Session], T]) -> T:
        with self.sessions() as s:
            return fn(s)

    def wait_for(self, job_id: str, done: Callable[[Job], bool], timeout: float = 60.0) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if done(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck at {job.status} {job.progress}\n{self.worker_logs()}")
            time.sleep(0.1)

    def worker_logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.workdir.glob("*.log")))


def make_stack(workdir: Path, database_url: str, redis_url: str) -> Stack:
    """Migrate the store and build the settings and the sending app."""
    engine = make_engine(database_url)
    migrate(engine)
    broker, backend = redis_url, redis_url.rsplit("/", 1)[0] + "/1"
    settings = Settings(database_url=database_url, broker_url=broker, result_backend=backend,
                        artifact_root=str(workdir / "artifacts"), work_dir=str(workdir / "work"),
                        progress_interval_s=0.0, lease_seconds=30.0, embed_timeout_s=60.0)
    return Stack(settings, engine, session_factory(engine), make_celery(settings), workdir)


@contextmanager
def celery_worker(stack: Stack, name: str, queues: str = "train,embed", timeout: float = 90.0,
                  env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery -A worker.app worker`` process configured by ``SIMMIM_*`` variables.

    It leads its own process group, so ``os.killpg(proc.pid, SIGKILL)`` takes it down with its
    pool processes, as a machine that dies would. ``env`` adds variables (e.g. ``SIMMIM_FAULTS``).
    """
    full_env = {**os.environ, **settings_env(stack.settings), "PYTHONPATH": str(ROOT), **(env or {})}
    log = (stack.workdir / f"{name}.log").open("ab")
    cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues, "-c", "1",
           "--pool", "prefork", "-n", f"{name}@%h", "--loglevel", "INFO", "--without-mingle",
           "--without-gossip"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_ready(stack, name, proc, timeout)
        yield proc
    finally:
        stop_worker(proc)
        log.close()


def _wait_ready(stack: Stack, name: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {proc.returncode}\n{stack.worker_logs()}")
        try:
            replies = stack.app.control.ping(timeout=0.5) or []
        except (OSError, redis.exceptions.ConnectionError):  # a broker that just restarted; ask again
            time.sleep(0.2)
            continue
        if any(name in node for reply in replies for node in reply):
            return
    raise RuntimeError(f"worker {name} did not answer a ping within {timeout:g} s\n{stack.worker_logs()}")


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """Warm-shutdown a worker (SIGTERM), killing it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
