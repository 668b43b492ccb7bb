"""``simmim-service worker``: start and supervise Celery worker processes.

With ``gpus`` there is one worker process per GPU (``CUDA_VISIBLE_DEVICES=<gpu>``,
concurrency 1, node ``<queues>-gpu<N>@<host>``), so one training job owns one GPU; with
``gpus_per_worker=K`` one process per K GPUs (node ``<queues>-gpu0-1@<host>``), which also
takes multi-GPU jobs of up to K GPUs. The
supervisor restarts a process that crashes (exponential backoff), forwards SIGTERM/SIGINT
to all of them (Celery's warm shutdown, during which training jobs checkpoint and are
re-queued) and exits when all have exited.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

from simmim_service.settings import Settings
from worker.celery_app import TRAIN_QUEUE, train_queues

log = logging.getLogger(__name__)


@dataclass
class WorkerProcess:
    """One supervised command and its restart bookkeeping."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    exit_code: int | None = field(default=None)


def settings_env(settings: Settings) -> dict[str, str]:
    """``SIMMIM_*`` variables that reproduce ``settings`` in a child process."""
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        text = value if isinstance(value, str) else json.dumps(value)
        env[f"SIMMIM_{name.upper()}"] = text
    return env


def worker_commands(queues: Sequence[str], gpus: Sequence[int] | None, concurrency: int | None,
                    loglevel: str, settings: Settings, *, gpus_per_worker: int = 1) -> list[WorkerProcess]:
    """The Celery worker processes to run for these options.

    With ``gpus``, the GPUs are split into groups of ``gpus_per_worker`` and each group gets
    one worker process (``CUDA_VISIBLE_DEVICES`` = the group, ``SIMMIM_WORKER_GPUS`` = its
    size) consuming the training queues for jobs of 1..size GPUs. Without ``gpus`` a training
    worker owns ``gpus_per_worker`` devices of whatever it runs on (CPU processes on a
    CPU-only machine).
    """
    if gpus_per_worker < 1:
        raise ValueError(f"gpus_per_worker must be at least 1, got {gpus_per_worker}")
    label = "-".join(queues)
    train_only = list(queues) == [TRAIN_QUEUE]

    def argv(node: str, processes: int | None, devices: int) -> list[str]:
        consumed = [q for name in queues for q in (train_queues(devices) if name == TRAIN_QUEUE else [name])]
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", ",".join(consumed),
               "--pool", "prefork", "-n", node, "--loglevel", loglevel]
        if processes is not None:
            cmd += ["--concurrency", str(processes)]
        if train_only:  # a fresh process per job returns all GPU and host memory
            cmd += ["--max-tasks-per-child", "1"]
        return cmd

    def env(devices: int, group: Sequence[int] | None = None) -> dict[str, str]:
        own = settings.model_copy(update={"worker_gpus": devices})
        extra = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, group))} if group is not None else {}
        return {**os.environ, **settings_env(own), **extra}

    if gpus:
        groups = [list(gpus[i:i + gpus_per_worker]) for i in range(0, len(gpus), gpus_per_worker)]
        workers = []
        for group in groups:
            name = f"{label}-gpu{'-'.join(map(str, group))}"
            workers.append(WorkerProcess(name, argv(f"{name}@%h", 1, len(group)), env(len(group), group)))
        return workers
    devices = gpus_per_worker if TRAIN_QUEUE in queues else 1
    processes = concurrency if concurrency is not None else (1 if TRAIN_QUEUE in queues else None)
    return [WorkerProcess(label, argv(f"{label}@%h", processes, devices), env(devices))]


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process may use, without importing torch (or touching CUDA).

    ``CUDA_VISIBLE_DEVICES`` when it lists indices, else what ``nvidia-smi -L`` reports.

    Raises:
        RuntimeError: No GPU can be listed.
    """
    declared = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if declared and all(part.strip().isdigit() for part in declared.split(",")):
        return list(range(len(declared.split(","))))
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot list GPUs with nvidia-smi ({err}); pass --gpus 0,1,... explicitly") from None
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if count == 0:
        raise RuntimeError("nvidia-smi lists no GPU; run without --gpus for a CPU worker")
    return list(range(count))


class Supervisor:
    """Runs worker processes until they all exit, restarting crashed ones with backoff."""

    def __init__(self, workers: list[WorkerProcess], *, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 stable_after_s: float = 60.0, poll_s: float = 0.5) -> None:
        self.workers = workers
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.stable_after_s, self.poll_s = stable_after_s, poll_s
        self.stopping = False
        self._wake = threading.Event()

    def run(self, handle_signals: bool = True) -> int:
        """Supervise until every process has exited; returns the worst exit code.

        ``handle_signals=False`` lets another component (the embedded server) own SIGINT/SIGTERM
        and call :meth:`stop`; it is required when running outside the main thread.
        """
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            for worker in self.workers:
                self._start(worker)
            while self._tick():
                self._wake.wait(self.poll_s)
                self._wake.clear()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return max((abs(w.exit_code or 0) for w in self.workers), default=0)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop restarting and pass ``sig`` on to every running process."""
        self.stopping = True
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(sig)
        self._wake.set()

    def kill(self) -> None:
        """SIGKILL every worker still running, with its pool processes (each leads its own group)."""
        self.stopping = True
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                log.warning("worker %s did not stop in time; killing it and its pool processes", worker.name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.proc.pid, signal.SIGKILL)
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(signum)

    def _tick(self) -> bool:
        """Reap and restart processes; False once nothing runs or waits to be restarted."""
        alive = False
        now = time.monotonic()
        for worker in self.workers:
            if worker.proc is None:
                if not self.stopping and worker.next_start and now >= worker.next_start:
                    self._start(worker)
                alive |= worker.proc is not None or (not self.stopping and bool(worker.next_start))
                continue
            code = worker.proc.poll()
            if code is None:
                alive = True
                continue
            self._reaped(worker, code, now)
            alive |= bool(worker.next_start)
        return alive

    def _reaped(self, worker: WorkerProcess, code: int, now: float) -> None:
        worker.proc, worker.exit_code, worker.next_start = None, code, 0.0
        if self.stopping or code == 0:
            log.info("worker %s exited with code %d", worker.name, code)
            return
        if now - worker.started_at >= self.stable_after_s:
            worker.restarts = 0
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** worker.restarts)
        worker.restarts += 1
        worker.next_start = now + delay
        log.warning("worker %s exited with code %d; restarting in %.0f s", worker.name, code, delay)

    def _start(self, worker: WorkerProcess) -> None:
        # Own session: a terminal's Ctrl+C reaches the workers once, through us.
        worker.proc = subprocess.Popen(worker.argv, env=worker.env, start_new_session=True)
        worker.started_at, worker.next_start = time.monotonic(), 0.0
        log.info("started worker %s (pid %d)", worker.name, worker.proc.pid)


def worker_main(queues: list[str], gpus: list[int] | None, concurrency: int | None, loglevel: str,
                settings: Settings, gpus_per_worker: int = 1) -> int:
    """Start the worker processes for ``queues`` and supervise them; returns the exit code."""
    commands = worker_commands(queues, gpus, concurrency, loglevel, settings, gpus_per_worker=gpus_per_worker)
    return Supervisor(commands).run()
