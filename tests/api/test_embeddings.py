"""Embeddings: what the API sends to the worker, what it answers, and dataset embedding runs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.dispatch import CeleryDispatcher
from api.errors import BadGateway, GatewayTimeout, Unprocessable
from jobstore import repo
from jobstore.states import JobStatus
from tests.api.conftest import ALICE, LiveApi, assert_problem, live_api, make_settings
from tests.api.fakes import DIM, FakeDispatcher, fake_vector
from tests.api.pictures import png
from tests.api.store import seed_checkpoint, seed_job


def test_json_images_reach_the_worker_and_vectors_come_back_in_order(api: LiveApi, alice: httpx.Client,
                                                                      fake: FakeDispatcher) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    images = [png(8, (255, 0, 0)), png(12, (0, 255, 0)), png(16, (0, 0, 255))]
    encoded = [base64.b64encode(i).decode() for i in images]
    r = alice.post(f"/v1/jobs/{job_id}/embeddings",
                   json={"images": encoded, "names": ["r", "g", "b"], "pooling": "cls", "normalize": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == DIM and body["model"] == "vit_tiny_patch16_224" and body["checkpoint_id"] is None
    assert [(d["index"], d["name"]) for d in body["data"]] == [(0, "r"), (1, "g"), (2, "b")]
    assert [d["embedding"] for d in body["data"]] == [pytest.approx(fake_vector(i)) for i in images]
    ((payload, timeout),) = fake.embed_calls
    assert payload == {"job_id": job_id, "checkpoint_id": None, "images_b64": encoded, "pooling": "cls",
                       "layer": None, "normalize": True}
    assert timeout == api.settings.embed_timeout_s


def test_multipart_files_with_form_options_and_a_checkpoint_of_a_running_job(
        api: LiveApi, alice: httpx.Client, fake: FakeDispatcher) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    ckpt, _ = seed_checkpoint(api.sessions, api.artifacts, job_id)
    images = [png(8), png(9)]
    r = alice.post(f"/v1/jobs/{job_id}/embeddings",
                   files=[("files", ("a.png", images[0], "image/png")), ("files", ("b.png", images[1], "image/png"))],
                   data={"layer": "-2", "normalize": "true", "checkpoint_id": ckpt})
    assert r.status_code == 200, r.text
    assert [d["name"] for d in r.json()["data"]] == ["a.png", "b.png"] and r.json()["checkpoint_id"] == ckpt
    ((payload, _),) = fake.embed_calls
    assert payload["layer"] == -2 and payload["normalize"] is True and payload["pooling"] == "mean"
    assert [base64.b64decode(b) for b in payload["images_b64"]] == images


@pytest.mark.parametrize(("error", "status"), [(Unprocessable("the embedding worker refused the input: bad"), 422),
                                               (GatewayTimeout("no embedding worker answered"), 504),
                                               (BadGateway("embedding worker failed (RuntimeError)"), 502)])
def test_worker_failures_become_problems(api: LiveApi, alice: httpx.Client, fake: FakeDispatcher,
                                         error: Exception, status: int) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    fake.embed_error = error  # type: ignore[assignment]
    r = alice.post(f"/v1/jobs/{job_id}/embeddings", json={"images": [base64.b64encode(png()).decode()]})
    assert_problem(r, status, str(error.detail))  # type: ignore[attr-defined]


def test_real_celery_dispatcher_times_out_without_an_embed_worker(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", broker_url=redis_url,
                             result_backend=redis_url, embed_timeout_s=0.5)
    with live_api(settings) as live:
        job_id = seed_job(live.sessions, status=JobStatus.SUCCEEDED)
        r = live.client(ALICE).post(f"/v1/jobs/{job_id}/embeddings",
                                    json={"images": [base64.b64encode(png()).decode()]})
        assert_problem(r, 504, "within 0.5 s", "'embed' queue")


class _Result:
    """Stands in for a Celery AsyncResult whose ``get`` raises what the worker raised."""

    id = "task-1"

    def __init__(self, error: Exception) -> None:
        self.error, self.forgotten = error, False

    def get(self, timeout: float, propagate: bool, interval: float = 0.5) -> Any:
        raise self.error

    def forget(self) -> None:
        self.forgotten = True


@pytest.mark.parametrize(("raised", "expected"), [(ValueError("cannot identify image file"), Unprocessable),
                                                  (RuntimeError("CUDA error"), BadGateway)])
def test_celery_dispatcher_maps_worker_exceptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  raised: Exception, expected: type[Exception]) -> None:
    dispatcher = CeleryDispatcher(make_settings(tmp_path, "sqlite://"))
    result = _Result(raised)
    monkeypatch.setattr(dispatcher, "_send", lambda *a, **k: result)
    with pytest.raises(expected):
        dispatcher.embed({"job_id": "job_x"}, timeout=1)
    assert result.forgotten


def test_chunked_body_over_the_limit_is_refused_while_streaming(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"0" * 100_000

    r = alice.post(f"/v1/jobs/{job_id}/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "exceeds the limit")


def test_embedding_run_lifecycle(api: LiveApi, alice: httpx.Client, fake: FakeDispatcher) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    dataset = str(Path(api.settings.allowed_roots[0]) / "digits")
    r = alice.post(f"/v1/jobs/{job_id}/embedding-runs", json={"dataset": dataset, "normalize": True})
    assert r.status_code == 202, r.text
    run = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job_id}/embedding-runs/{run['id']}"
    assert run["status"] == "queued" and run["embeddings_url"] is None and run["options"]["normalize"] is True
    assert fake.embedding_runs == [(job_id, run["id"])]
    assert_problem(alice.get(f"/v1/jobs/{job_id}/embedding-runs/{run['id']}/files"), 409, "queued")

    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    keys = {"embeddings_key": f"jobs/{job_id}/embeddings/{run['id']}/embeddings.npy",
            "files_key": f"jobs/{job_id}/embeddings/{run['id']}/files.txt"}
    for key, data in [(keys["embeddings_key"], buffer.getvalue()), (keys["files_key"], b"a.png\nb.png\nc.png\n")]:
        api.artifacts.local_path(key).parent.mkdir(parents=True, exist_ok=True)
        api.artifacts.local_path(key).write_bytes(data)
    with api.sessions.begin() as s:
        repo.update_embedding_run(s, run_id=run["id"], status=JobStatus.SUCCEEDED, count=3, **keys)

    done = alice.get(f"/v1/jobs/{job_id}/embedding-runs/{run['id']}").json()
    assert done["status"] == "succeeded" and done["count"] == 3 and done["finished_at"]
    npy = alice.get(done["embeddings_url"])
    assert npy.status_code == 200 and np.array_equal(np.load(io.BytesIO(npy.content)), vectors)
    assert alice.get(done["files_url"]).text.splitlines() == ["a.png", "b.png", "c.png"]


def test_embedding_run_needs_a_succeeded_job_and_a_broker(api: LiveApi, alice: httpx.Client,
                                                         fake: FakeDispatcher) -> None:
    dataset = str(Path(api.settings.allowed_roots[0]) / "digits")
    running = seed_job(api.sessions, status=JobStatus.RUNNING)
    assert_problem(alice.post(f"/v1/jobs/{running}/embedding-runs", json={"dataset": dataset}), 409, "running")
    fake.broker_down = True
    done = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    body = assert_problem(alice.post(f"/v1/jobs/{done}/embedding-runs", json={"dataset": dataset}), 503)
    assert alice.get(f"/v1/jobs/{done}/embedding-runs/{body['run_id']}").json()["status"] == "queued"
