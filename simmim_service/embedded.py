"""``simmim-service serve``: the API, and with ``--embedded`` its workers too, in one command.

Embedded mode needs no Redis, PostgreSQL or Docker: the job store is SQLite, the Celery
broker is kombu's SQLAlchemy transport on a SQLite file, and one training and one embedding
worker process run under a supervisor that restarts them if they crash and stops them
when the server stops. The task code is the same as in a deployment.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from simmim_service.settings import Settings

log = logging.getLogger(__name__)

STOP_GRACE_S = 90.0
"""How long ``serve`` waits for its workers to stop before it kills them."""


def embedded_settings(base: Settings, data_dir: Path) -> Settings:
    """``base`` with the store, broker, results and artifacts moved under ``data_dir``."""
    d = data_dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    return base.model_copy(update={
        "database_url": f"sqlite:///{d / 'jobs.db'}",
        "broker_url": f"sqla+sqlite:///{d / 'broker.db'}",
        "result_backend": f"db+sqlite:///{d / 'results.db'}",
        "artifact_root": str(d / "artifacts"),
        "work_dir": str(d / "work"),
        "auth_required": bool(base.api_keys),
        # One local training worker owns worker_gpus devices: larger jobs could never run here.
        "max_job_gpus": base.worker_gpus,
    })


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising SIGINT/SIGTERM after shutdown: ``serve`` must
    outlive the HTTP server long enough to stop its workers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(*, embedded: bool, host: str | None, port: int | None, data_dir: Path) -> int:
    """Run the API until SIGINT/SIGTERM (and, embedded, its supervised workers).

    ``host``/``port`` None: ``SIMMIM_HOST``/``SIMMIM_PORT`` (127.0.0.1:8000 unless set).
    """
    from api.main import create_app
    from jobstore.db import make_engine, migrate
    from worker.cli import Supervisor, worker_commands

    settings = Settings()
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    if embedded:
        settings = embedded_settings(settings, data_dir)
        if not settings.api_keys and not _is_loopback(host):
            print(f"error: embedded mode without SIMMIM_API_KEYS only listens on loopback, not {host}",
                  file=sys.stderr)
            return 2
    engine = make_engine(settings.database_url)
    migrate(engine)  # before any worker starts, so they never race on the schema
    engine.dispose()
    supervisor = thread = None
    if embedded:
        supervisor = Supervisor(
            worker_commands(["train"], None, 1, "warning", settings, gpus_per_worker=settings.worker_gpus)
            + worker_commands(["embed"], None, 1, "warning", settings))
        thread = threading.Thread(target=supervisor.run, kwargs={"handle_signals": False},
                                  name="worker-supervisor", daemon=True)
        thread.start()
    try:
        _Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning")).run()
    finally:
        if supervisor is not None and thread is not None:
            supervisor.stop()  # warm shutdown: a training job checkpoints and is re-queued
            thread.join(timeout=STOP_GRACE_S)
            if thread.is_alive():  # a stuck worker must not outlive serve
                supervisor.kill()
                thread.join(timeout=10)
    return 0
