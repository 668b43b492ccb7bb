"""Restarting the service under a running job loses nothing: the API alone, and the whole
embedded service (its workers included), as a user's HTTP client sees it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from simmim_service.client import SimMIMClient
from tests.api.conftest import live_api
from tests.services import free_port, processes_using, redis_server, wait_until_ready
from tests.worker.stack import TINY_TRAINING, celery_worker, make_stack

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KEY = "restart-key"


def _spec(dataset: Path, **training: Any) -> dict[str, Any]:
    return {"dataset": str(dataset), "training": {**TINY_TRAINING, **training}}


def _wait_step(client: SimMIMClient, job_id: str, step: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get_job(job_id)
        if (job["progress"].get("step") or 0) >= step or job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_api_restart_mid_job(digits: dict[str, Path], tmp_path: Path, record_property: Any) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    record_property("jobs", 1)
    with redis_server(tmp_path) as redis_url:
        stack = make_stack(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", redis_url)
        settings = stack.settings.model_copy(update={"api_keys": {KEY: "t"}, "auth_required": True,
                                                     "allowed_roots": [str(digits["train"].parent)]})
        stack.settings = settings
        try:
            with celery_worker(stack, "w"):
                with live_api(settings) as api, SimMIMClient(api.url, api_key=KEY) as client:
                    job = client.create_job(_spec(digits["train"], max_steps=30, checkpoint_every=10))
                    _wait_step(client, job["id"], 3)
                    stream = client.events(job["id"])
                    seen = [e.id for e in itertools.islice(stream, 5) if e.id is not None]
                    stream.close()
                # The API is gone for a while; training goes on.
                time.sleep(1)
                with live_api(settings) as api, SimMIMClient(api.url, api_key=KEY) as client:
                    done = client.wait(job["id"], timeout=180, poll=0.2)
                    later = [e.id for e in client.events(job["id"], last_event_id=max(seen))]
        finally:
            stack.close()
    assert done["status"] == "succeeded" and done["progress"]["step"] == 30
    assert [a["reason"] for a in done["attempts"]] == ["succeeded"]
    assert later and min(i for i in later if i is not None) > max(seen)  # the stream resumes, no repeats


@contextmanager
def embedded_service(data_dir: Path, port: int, allowed: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMMIM_ALLOWED_ROOTS": json.dumps([str(allowed)]),
           "SIMMIM_PROGRESS_INTERVAL_S": "0", "SIMMIM_API_KEYS": json.dumps({KEY: "t"})}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "simmim_service.cli", "serve", "--embedded", "--port",
                                 str(port), "--data-dir", str(data_dir)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_until_ready(f"http://127.0.0.1:{port}", proc, log)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=150) == 0, log.read_text()[-3000:]
            assert processes_using(str(data_dir)) == [], "serve left worker processes behind"


def test_embedded_service_restart_mid_job(digits: dict[str, Path], tmp_path: Path, record_property: Any) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    record_property("jobs", 1)
    port, data = free_port(), tmp_path / "service"
    url = f"http://127.0.0.1:{port}"
    with embedded_service(data, port, digits["train"].parent, tmp_path / "serve.log"), \
            SimMIMClient(url, api_key=KEY) as client:
        job = client.create_job(_spec(digits["train"], max_steps=30, checkpoint_every=5))
        stopped_at = _wait_step(client, job["id"], 7)["progress"]["step"]
    # serve has stopped (SIGTERM): its workers checkpointed and handed the job back.
    with embedded_service(data, port, digits["train"].parent, tmp_path / "serve.log"), \
            SimMIMClient(url, api_key=KEY) as client:
        done = client.wait(job["id"], timeout=240, poll=0.2)
        events = [e.data for e in client.events(job["id"])]
    assert done["status"] == "succeeded" and done["progress"]["step"] == 30, done
    assert [a["reason"] for a in done["attempts"]][-1] == "succeeded" and len(done["attempts"]) == 2
    resumed = [e["message"] for e in events if isinstance(e, dict) and str(e.get("message", "")).startswith("resuming")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= stopped_at
