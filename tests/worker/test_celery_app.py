"""The Celery app: delivery settings, routing through a real Redis, and a torch-free parent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from simmim_service.settings import Settings
from tests.services import redis_server
from worker.celery_app import (
    EMBED_DATASET_TASK,
    EMBED_TASK,
    PRETRAIN_TASK,
    VISIBILITY_TIMEOUT_S,
    make_celery,
)
from worker.cli import settings_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


def test_delivery_settings_fit_long_leased_jobs() -> None:
    app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/1"))
    conf = app.conf
    assert conf.task_serializer == conf.result_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_track_started
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == VISIBILITY_TIMEOUT_S >= 7 * 24 * 3600
    assert {PRETRAIN_TASK, EMBED_TASK, EMBED_DATASET_TASK} <= set(app.tasks)
    assert not app.tasks[EMBED_TASK].reject_on_worker_lost  # a poison image must not loop forever
    assert app.settings.broker_url == "redis://127.0.0.1:1/0"


def test_each_task_lands_only_on_its_own_queue(redis_url: str) -> None:
    app = make_celery(Settings(broker_url=redis_url, result_backend=redis_url))
    client = redis.Redis.from_url(redis_url)
    try:
        app.send_task(PRETRAIN_TASK, args=["job_x"])
        assert (client.llen("train"), client.llen("embed")) == (1, 0)
        app.send_task(EMBED_DATASET_TASK, args=["job_x", "emb_y"])
        app.send_task(EMBED_TASK, kwargs={"job_id": "job_x", "images_b64": []})
        assert (client.llen("train"), client.llen("embed")) == (1, 2)
        # A bare sender (like the API's dispatcher) naming the queue reaches the same list.
        api = Celery("api", broker=redis_url, set_as_current=False)
        api.conf.update(task_serializer="json", accept_content=["json"])
        api.send_task(PRETRAIN_TASK, args=["job_z"], queue="train")
        assert (client.llen("train"), client.llen("embed")) == (2, 2)
        body = json.loads(client.lindex("train", 0) or b"{}")
        assert body["headers"]["task"] == PRETRAIN_TASK and body["content-type"] == "application/json"
        api.close()
    finally:
        client.close()
        app.close()


def test_worker_app_reads_settings_from_the_environment_and_never_imports_torch(tmp_path: Path) -> None:
    settings = Settings(broker_url="redis://example:6379/3", artifact_root=str(tmp_path),
                        api_keys={"k": "tenant"}, allowed_roots=[str(tmp_path)])
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    code = ("import sys, json; from worker.app import app; "
            "print(json.dumps([app.settings.model_dump(mode='json'), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    dumped, torch_loaded = json.loads(out.stdout.splitlines()[-1])
    assert dumped == settings.model_dump(mode="json")
    assert torch_loaded is False
