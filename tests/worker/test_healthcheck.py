"""``python -m worker.healthcheck`` against real Celery workers on a throwaway Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simmim_service.settings import Settings
from tests.services import free_port
from tests.worker.stack import ROOT, Stack, celery_worker
from worker.cli import settings_env
from worker.healthcheck import check, local_worker_nodes, worker_node

HOST = socket.gethostname()


def run_healthcheck(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "worker.healthcheck", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_healthy_when_every_local_worker_answers_and_unhealthy_when_one_hangs(stack: Stack) -> None:
    with celery_worker(stack, "hc-train-gpu0", queues="train"), \
            celery_worker(stack, "hc-embed", queues="embed") as embed:
        done = run_healthcheck(stack.settings, "--timeout", "3")
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("healthy: 2 Celery worker(s) answered")
        assert f"hc-embed@{HOST}" in lines[0] and f"hc-train-gpu0@{HOST}" in lines[0]

        os.kill(embed.pid, signal.SIGSTOP)  # alive in the process table, deaf to the broker
        try:
            started = time.monotonic()
            done = run_healthcheck(stack.settings, "--timeout", "2")
            assert time.monotonic() - started < 30
        finally:
            os.kill(embed.pid, signal.SIGCONT)
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stdout.splitlines() == [
            f"unhealthy: 1 of 2 Celery worker(s) did not answer a ping within 2 s: hc-embed@{HOST}"]


def test_unhealthy_without_any_worker(stack: Stack) -> None:
    done = run_healthcheck(stack.settings, "--timeout", "1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"unhealthy: no Celery worker process on this host uses the broker {stack.settings.broker_url}"]


def test_a_named_node_that_does_not_exist_is_silent(stack: Stack) -> None:
    code, line = check(stack.settings, 1.0, nodes=[f"train-gpu7@{HOST}"])
    assert (code, line) == (1, f"unhealthy: 1 of 1 Celery worker(s) did not answer a ping within 1 s: "
                               f"train-gpu7@{HOST}")


def test_unreachable_broker_fails_fast_without_leaking_its_password() -> None:
    settings = Settings(broker_url=f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    code, line = check(settings, 2.0, nodes=["train-gpu0@h"])
    assert time.monotonic() - started < 15
    assert code == 1 and line.startswith("unhealthy: broker redis://:**@127.0.0.1:") and "unreachable" in line
    assert "s3cret" not in line


def test_invalid_settings_are_one_unhealthy_line(stack: Stack) -> None:
    done = run_healthcheck(stack.settings.model_copy(update={"lease_seconds": -1.0}))
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("unhealthy: invalid SIMMIM_* settings:") and "lease_seconds" in line


@pytest.mark.parametrize(("argv", "node"), [
    (["/opt/venv/bin/python", "-m", "celery", "-A", "worker.app", "worker", "-Q", "train",
      "-n", "train-gpu1@%h", "--concurrency", "1"], f"train-gpu1@{HOST}"),
    (["/opt/venv/bin/python", "/opt/venv/bin/celery", "--app", "worker.app", "worker", "--hostname=embed@%h"],
     f"embed@{HOST}"),
    (["celery", "-A", "worker.app", "worker", "-nsolo@box"], "solo@box"),
    (["celery", "-A", "worker.app", "worker"], f"celery@{HOST}"),  # Celery's default name
    (["[celeryd: train-gpu0@box:MainProcess] -active- (worker -A worker.app)"], "train-gpu0@box"),  # setproctitle
    (["celery", "-A", "worker.app", "flower"], None),
    (["celery", "-A", "worker", "inspect", "ping"], None),
    (["python", "-m", "worker.healthcheck"], None),
    (["simmim-service", "worker", "--queues", "train", "--gpus", "all"], None),  # the supervisor itself
    ([], None),
])
def test_worker_node_from_a_command_line(argv: list[str], node: str | None) -> None:
    assert worker_node(argv) == node


def test_only_workers_of_our_broker_are_expected(tmp_path: Path) -> None:
    ours, theirs = "redis://redis:6379/0", "redis://elsewhere:6379/0"

    def process(pid: int, argv: list[str], env: dict[str, str]) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (tmp_path / str(pid) / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in env.items()))

    def celery(node: str) -> list[str]:
        return ["python", "-m", "celery", "-A", "worker.app", "worker", "-n", node]

    process(10, celery("train-gpu0@%h"), {"SIMMIM_BROKER_URL": ours})
    process(11, celery("train-gpu0@%h"), {"SIMMIM_BROKER_URL": ours})  # its prefork child
    process(12, celery("train-gpu1@%h"), {"SIMMIM_BROKER_URL": ours, "CUDA_VISIBLE_DEVICES": "1"})
    process(13, celery("other@%h"), {"SIMMIM_BROKER_URL": theirs})
    process(14, ["simmim-service", "worker"], {"SIMMIM_BROKER_URL": ours})
    process(15, celery("default@%h"), {})  # no SIMMIM_BROKER_URL: the settings default broker
    (tmp_path / "16").mkdir()  # vanished, or another user's: unreadable
    (tmp_path / "self").mkdir()

    assert local_worker_nodes(ours, tmp_path) == {f"train-gpu0@{HOST}", f"train-gpu1@{HOST}"}
    assert local_worker_nodes(Settings.model_fields["broker_url"].default, tmp_path) == {f"default@{HOST}"}
