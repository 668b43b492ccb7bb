"""Run one training as N data-parallel processes on this machine, from inside a Python process.

``torchrun`` is for people at a shell; a service task needs the same thing as a function
call that behaves like :func:`simmim.engine.train`: progress, checkpoints and the result
come back to the caller, and the caller's ``should_stop`` stops every rank at the same
step. :func:`train_processes` spawns ``nprocs`` processes with the torchrun environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` on loopback),
so the engine joins a process group exactly as under torchrun: NCCL on GPUs (rank ``r``
uses ``cuda:r`` of the visible devices), gloo on CPU.

The ranks are fresh interpreters (``python -m simmim.launch``), not ``multiprocessing``
children, so this works from anywhere, including a Celery pool process (whose
``multiprocessing`` state belongs to billiard). Each rank connects back to the caller over
an authenticated Unix socket. The caller stays the only one that talks to the outside
world: rank 0 sends its progress reports and checkpoint notices and waits for each
checkpoint to be acknowledged (so an upload finishes before the next save can prune the
file); a stop request is sent to every rank. If a rank dies or raises, the others are
terminated and the error is raised in the caller with its original type where it can be
rebuilt. A rank whose caller dies is killed by the kernel (``PR_SET_PDEATHSIG``), so no
process keeps computing for a task that is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any

from simmim.config import TrainConfig
from simmim.engine import CheckpointCallback, Progress, ProgressCallback, TrainResult
from simmim.errors import ConfigError, SimMIMError

log = logging.getLogger(__name__)

ADDRESS_ENV, AUTHKEY_ENV = "SIMMIM_LAUNCH_ADDRESS", "SIMMIM_LAUNCH_AUTHKEY"


class RankFailedError(SimMIMError):
    """A training process died without reporting an exception (killed, or a crash in C code)."""


@dataclass
class _Run:
    """What the caller has seen of a multi-process run so far."""

    procs: list[subprocess.Popen[bytes]]
    conns: dict[int, Connection] = field(default_factory=dict)  # rank -> its connection
    result: TrainResult | None = None
    last_progress: Progress | None = None
    last_checkpoint: Any = None
    errors: dict[int, BaseException] = field(default_factory=dict)  # in order of arrival
    stopping: bool = False


def train_processes(
    cfg: TrainConfig,
    nprocs: int,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: bool = True,
    on_start: Callable[[list[int]], None] | None = None,
    poll_s: float = 0.1,
    stop_grace_s: float = 120.0,
) -> TrainResult:
    """Train ``cfg`` with ``nprocs`` DDP processes; same contract as :func:`simmim.engine.train`.

    Args:
        cfg: The configuration; ``optim.batch_size`` is per process.
        nprocs: Number of processes (GPUs on a CUDA machine).
        on_progress: Called here (in the caller) with rank 0's progress reports.
        should_stop: Polled here every ``poll_s``; once True every rank checkpoints and stops.
        on_checkpoint: Called here for each checkpoint rank 0 saved, before it continues.
        resume: Continue from the newest valid checkpoint.
        on_start: Called with the process ids once all ranks are started.
        poll_s: How often the caller's ``should_stop`` is asked.
        stop_grace_s: After a stop, how long the ranks get to checkpoint and exit before
            they are terminated (the run then ends at the last checkpoint recorded).

    Raises:
        ConfigError: ``nprocs`` CUDA devices are needed but fewer are visible.
        Exception: What a rank raised (same type where it can be rebuilt), or
            :class:`RankFailedError` when a rank died without a word.
    """
    if nprocs < 1:
        raise ConfigError([f"nprocs must be at least 1, got {nprocs}"])
    _check_devices(cfg, nprocs)
    authkey = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="simmim-launch-") as tmp:
        address = os.path.join(tmp, "control.sock")
        with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
            run = _Run(procs=_start_ranks(nprocs, address, authkey))
            try:
                if on_start is not None:
                    on_start([p.pid for p in run.procs])
                _connect(run, listener, cfg.model_dump(mode="json"), resume)
                return _supervise(run, on_progress, should_stop, on_checkpoint, poll_s, stop_grace_s)
            finally:
                _terminate(run.procs)
                for conn in run.conns.values():
                    conn.close()


def _start_ranks(nprocs: int, address: str, authkey: bytes) -> list[subprocess.Popen[bytes]]:
    port = _free_port()
    procs = []
    for rank in range(nprocs):
        env = {**os.environ, ADDRESS_ENV: address, AUTHKEY_ENV: authkey.hex(), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(nprocs),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nprocs)}
        procs.append(subprocess.Popen([sys.executable, "-m", "simmim.launch"], env=env))
    return procs


def _connect(run: _Run, listener: Listener, payload: dict[str, Any], resume: bool,
             timeout_s: float = 300.0) -> None:
    """Accept every rank's connection and hand it the run (fails fast if a rank dies first)."""
    accepted: list[Connection] = []
    acceptor = threading.Thread(target=lambda: accepted.extend(listener.accept() for _ in run.procs),
                                name="simmim-launch-accept", daemon=True)
    acceptor.start()
    deadline = time.monotonic() + timeout_s
    while acceptor.is_alive():
        acceptor.join(timeout=0.1)
        dead = [(i, p.returncode) for i, p in enumerate(run.procs) if p.poll() is not None]
        if dead:
            raise RankFailedError(_death_message(dead) + " before it started training")
        if time.monotonic() > deadline:
            raise RankFailedError(f"the training processes did not start within {timeout_s:.0f} s")
    for conn in accepted:
        _, rank, _ = conn.recv()
        run.conns[rank] = conn
        conn.send(("start", payload, resume))


def _supervise(run: _Run, on_progress: ProgressCallback | None, should_stop: Callable[[], bool] | None,
               on_checkpoint: CheckpointCallback | None, poll_s: float, stop_grace_s: float) -> TrainResult:
    stop_deadline: float | None = None
    next_poll = 0.0
    while True:
        _drain(run, on_progress, on_checkpoint, timeout=poll_s)
        if run.errors or any(p.poll() not in (None, 0) for p in run.procs):
            raise _first_failure(run, on_progress, on_checkpoint)
        if all(p.poll() == 0 for p in run.procs):
            _drain(run, on_progress, on_checkpoint, timeout=0)  # what was sent just before exiting
            if run.result is None:
                raise RankFailedError("the training processes exited without a result")
            return run.result
        now = time.monotonic()
        if stop_deadline is None and should_stop is not None and now >= next_poll:
            next_poll = now + poll_s
            if should_stop():
                _send_all(run, ("stop", None, None))
                stop_deadline = now + stop_grace_s
        if stop_deadline is not None and now > stop_deadline:
            log.warning("training processes did not stop within %.0f s of the stop request; terminated",
                        stop_grace_s)
            _terminate(run.procs)
            return _stopped_result(run)


def _first_failure(run: _Run, on_progress: ProgressCallback | None,
                   on_checkpoint: CheckpointCallback | None, settle_s: float = 2.0) -> BaseException:
    """The root cause once some rank failed; every rank is stopped before it returns.

    One failure makes the other ranks fail too (their collectives lose a peer), so the
    ranks get ``settle_s`` to report, then: a rank killed by a signal we did not send is
    the cause; otherwise the first error that arrived.
    """
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and None in [p.poll() for p in run.procs]:
        _drain(run, on_progress, on_checkpoint, timeout=0.05)
    codes = [p.poll() for p in run.procs]
    killed = [(i, code) for i, code in enumerate(codes) if i not in run.errors and code is not None and code < 0]
    _terminate(run.procs)
    _drain(run, on_progress, on_checkpoint, timeout=0)
    if killed:
        return RankFailedError(_death_message(killed))
    if run.errors:
        return next(iter(run.errors.values()))
    dead = [(i, p.returncode) for i, p in enumerate(run.procs) if p.returncode not in (None, 0)]
    return RankFailedError(_death_message(dead))


def _send_all(run: _Run, message: tuple[str, Any, Any]) -> None:
    for conn in run.conns.values():
        with contextlib.suppress(OSError):  # that rank is gone; its exit code tells the story
            conn.send(message)


def _drain(run: _Run, on_progress: ProgressCallback | None, on_checkpoint: CheckpointCallback | None,
           timeout: float) -> None:
    """Handle every message waiting (blocking up to ``timeout`` for the first)."""
    while run.conns:
        ready = wait(list(run.conns.values()), timeout=timeout)
        if not ready:
            return
        timeout = 0
        for rank, conn in [(r, c) for r, c in run.conns.items() if c in ready]:
            try:
                kind, _, body = conn.recv()
            except (EOFError, OSError):  # the rank exited; its exit code is checked by the caller
                del run.conns[rank]
                conn.close()
                continue
            _handle(run, rank, kind, body, conn, on_progress, on_checkpoint)


def _handle(run: _Run, rank: int, kind: str, body: Any, conn: Connection,
            on_progress: ProgressCallback | None, on_checkpoint: CheckpointCallback | None) -> None:
    if kind == "progress":
        run.last_progress = body
        if on_progress is not None:
            on_progress(body)
    elif kind == "checkpoint":
        try:
            if on_checkpoint is not None:
                on_checkpoint(body)
            run.last_checkpoint = body
        finally:
            with contextlib.suppress(OSError):
                conn.send(("ack", None, None))
    elif kind == "result":
        run.result = body
    elif kind == "error":
        run.errors[rank] = _rebuild(*body)


def _stopped_result(run: _Run) -> TrainResult:
    """The outcome of a run whose ranks had to be terminated after a stop request."""
    p = run.last_progress
    ckpt = run.last_checkpoint
    return TrainResult(steps=ckpt.step if ckpt is not None else (p.step if p else 0),
                       total_steps=p.total_steps if p else 0, final_loss=p.loss if p else None,
                       checkpoint=ckpt, encoder_dir=None, skipped_images=p.skipped_images if p else 0,
                       stopped=True, resumed_from=None)


def _death_message(dead: Sequence[tuple[int, int | None]]) -> str:
    parts = [f"rank {rank} " + (f"was killed by signal {-code}" if code is not None and code < 0
                                else f"exited with code {code}") for rank, code in dead]
    return ("a training process died: " + ", ".join(parts)
            + " (a signal 9 is usually the kernel's out-of-memory killer: lower batch_size or num_workers)")


def _terminate(procs: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM every rank still running, then SIGKILL what is left after ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _check_devices(cfg: TrainConfig, nprocs: int) -> None:
    if cfg.run.device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        if cfg.run.device.startswith("cuda"):
            raise ConfigError(["run.device: cuda requested but no CUDA device is available"])
        return
    if cfg.run.device not in ("auto", "cuda"):
        raise ConfigError([f"run.device: {cfg.run.device!r} pins one device; multi-process runs use "
                           "run.device=auto (rank r takes cuda:r)"])
    if torch.cuda.device_count() < nprocs:
        raise ConfigError([f"{nprocs} processes need {nprocs} GPUs but this worker sees "
                           f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _portable(exc: BaseException) -> tuple[bytes | None, str, str]:
    """An exception as (pickle if it round-trips, type name, message with traceback)."""
    text = "".join(traceback.format_exception(exc))
    blob: bytes | None
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, type(exc).__name__, text


def _rebuild(blob: bytes | None, name: str, text: str) -> BaseException:
    if blob is not None:
        try:
            exc: BaseException = pickle.loads(blob)
            return exc
        except Exception:
            pass
    last = text.strip().splitlines()[-1] if text.strip() else name
    return RankFailedError(f"a training process raised {last}")


class _Channel:
    """A rank's end of the connection: stop requests, acknowledgements, reports."""

    def __init__(self, conn: Connection, rank: int) -> None:
        self.conn, self.rank = conn, rank
        self.stop = False

    def send(self, kind: str, body: Any) -> None:
        self.conn.send((kind, self.rank, body))

    def _receive(self) -> str:
        try:
            kind, _, _ = self.conn.recv()
        except (EOFError, OSError):  # the caller is gone: nobody will record anything more
            self.stop = True
            return "gone"
        if kind == "stop":
            self.stop = True
        return str(kind)

    def should_stop(self) -> bool:
        while not self.stop and self.conn.poll():
            self._receive()
        return self.stop

    def checkpointed(self, info: Any) -> None:
        """Report a checkpoint and wait until the caller has recorded (uploaded) it."""
        self.send("checkpoint", info)
        while self._receive() not in ("ack", "gone"):
            pass


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _rank_main() -> int:
    """Body of one rank (``python -m simmim.launch``, started by :func:`train_processes`)."""
    _die_with_parent()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    conn = Client(os.environ[ADDRESS_ENV], family="AF_UNIX", authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
    channel = _Channel(conn, rank)
    try:
        channel.send("hello", None)
        _, payload, resume = conn.recv()
        import torch

        from simmim.engine import train

        if not torch.cuda.is_available():  # share the host's cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        cfg = TrainConfig.model_validate(payload)
        main = rank == 0
        result = train(cfg, resume=bool(resume), should_stop=channel.should_stop,
                       on_progress=(lambda p: channel.send("progress", p)) if main else None,
                       on_checkpoint=channel.checkpointed if main else None)
        if main:
            channel.send("result", result)
        return 0
    except BaseException as exc:
        with contextlib.suppress(OSError):
            channel.send("error", _portable(exc))
        return 1
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(_rank_main())
