"""The worker supervisor: one process per GPU, restarts with backoff, signal forwarding."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from simmim_service.settings import Settings
from tests.services import alive
from worker.cli import Supervisor, WorkerProcess, settings_env, worker_commands


def _python(name: str, code: str) -> WorkerProcess:
    return WorkerProcess(name, [sys.executable, "-c", code], dict(os.environ))


def test_one_pinned_worker_process_per_gpu() -> None:
    settings = Settings(database_url="sqlite:////tmp/x.db", allowed_roots=["/data"])
    workers = worker_commands(["train"], [0, 3], None, "INFO", settings)
    assert [w.name for w in workers] == ["train-gpu0", "train-gpu3"]
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "3"]
    argv = workers[1].argv
    assert argv[1:6] == ["-m", "celery", "-A", "worker.app", "worker"]
    assert argv[argv.index("-n") + 1] == "train-gpu3@%h" and argv[argv.index("-Q") + 1] == "train"
    assert argv[argv.index("--concurrency") + 1] == "1" and argv[argv.index("--pool") + 1] == "prefork"
    assert argv[argv.index("--max-tasks-per-child") + 1] == "1"
    assert workers[0].env["SIMMIM_DATABASE_URL"] == "sqlite:////tmp/x.db"
    assert workers[0].env["SIMMIM_ALLOWED_ROOTS"] == '["/data"]'

    (embed,) = worker_commands(["embed"], None, None, "INFO", settings)
    assert "--concurrency" not in embed.argv and "--max-tasks-per-child" not in embed.argv
    assert embed.env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")  # not pinned
    (both,) = worker_commands(["train", "embed"], None, 2, "DEBUG", settings)
    assert both.argv[both.argv.index("--concurrency") + 1] == "2" and both.name == "train-embed"


def test_settings_survive_the_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(api_keys={"key": "team"}, artifact_storage_options={"endpoint_url": "http://m:9000"},
                        lease_seconds=42.5, auth_required=False)
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_crashing_worker_is_restarted_with_backoff_and_signals_are_forwarded(tmp_path: Path) -> None:
    starts, stopped = tmp_path / "starts", tmp_path / "stopped"
    crasher = _python("crasher", f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)")
    sleeper = _python("sleeper", (
        "import signal, sys, time\n"
        f"def bye(*_): open({str(stopped)!r}, 'w').write('TERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "time.sleep(60)\n"))
    supervisor = Supervisor([crasher, sleeper], backoff_s=0.1, max_backoff_s=0.4, poll_s=0.02)
    previous = signal.getsignal(signal.SIGTERM)
    threading.Timer(1.5, os.kill, args=(os.getpid(), signal.SIGTERM)).start()
    began = time.monotonic()
    code = supervisor.run()

    assert time.monotonic() - began < 10
    assert stopped.read_text() == "TERM"  # SIGTERM reached the running worker
    assert sleeper.exit_code == 0 and code == 3  # the crasher's last exit code is the worst
    # Backoff 0.1, 0.2, 0.4, 0.4, ... within ~1.5 s: a handful of starts, not a tight loop.
    assert 2 <= len(starts.read_text()) <= 9 and crasher.restarts >= 1
    assert signal.getsignal(signal.SIGTERM) == previous  # our handler is removed again


def test_supervisor_returns_when_every_worker_has_exited_cleanly() -> None:
    workers = [_python("a", "pass"), _python("b", "import time; time.sleep(0.2)")]
    assert Supervisor(workers, poll_s=0.02).run() == 0
    assert [w.restarts for w in workers] == [0, 0]


def test_kill_takes_down_a_worker_that_ignores_sigterm_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    code = ("import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); time.sleep(120)")
    sup = Supervisor([_python("stubborn", code)], poll_s=0.05)
    thread = threading.Thread(target=sup.run, kwargs={"handle_signals": False})
    thread.start()
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parent, child = map(int, pids.read_text().split())
    sup.stop()
    thread.join(timeout=1)
    assert thread.is_alive()  # SIGTERM was ignored
    sup.kill()
    thread.join(timeout=10)
    assert not thread.is_alive()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in (parent, child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in (parent, child))
