"""Graceful hand-back of training jobs when a worker is asked to shut down.

Celery's warm shutdown (SIGTERM) waits for running tasks, and a training task may run for
days. So when the parent process starts shutting down it signals its pool children
(:data:`SHUTDOWN_SIGNAL`); a training task sees :func:`shutdown_requested`, lets the engine checkpoint,
marks the job ``recovering`` and re-queues it, and the worker then exits promptly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType

SHUTDOWN_SIGNAL: int = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2
"""A real-time signal where there is one: billiard re-maps the classic ones (SIGUSR2 among
them, with its plain pool) to "exit now" in pool processes, which would kill a training task
instead of letting it hand back; it never touches real-time signals."""
_requested = threading.Event()


def shutdown_requested() -> bool:
    """Whether this process has been asked to stop taking on work."""
    return _requested.is_set()


def request_shutdown(signum: int | None = None, frame: FrameType | None = None) -> None:
    """Mark this process as shutting down (also usable as a signal handler)."""
    _requested.set()


def install_child_handler() -> None:
    """In a pool child: turn :data:`SHUTDOWN_SIGNAL` into a shutdown request."""
    signal.signal(SHUTDOWN_SIGNAL, request_shutdown)


def notify_children() -> None:
    """In the parent: mark this process and signal every pool child to wind down.

    Runs inside a signal handler, so it only sets a flag and sends signals (no logging).
    """
    request_shutdown()
    from billiard.process import active_children

    for child in active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, SHUTDOWN_SIGNAL)
