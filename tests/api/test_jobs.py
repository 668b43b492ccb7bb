"""Jobs over real HTTP, on SQLite and PostgreSQL: create (and really enqueue), idempotency,
pagination, reading, tenant isolation, cancel and metric history."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobstore.states import JobStatus
from tests.api.conftest import (
    ALICE,
    BOB,
    LiveApi,
    assert_problem,
    job_body,
    live_api,
    make_settings,
)
from tests.api.fakes import FakeDispatcher
from tests.api.store import job_ids, move, report, seed_job, start
from tests.services import sqlite_or_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from sqlite_or_postgres(request.param, tmp_path)


def queued_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The Celery messages waiting in ``queue`` (kombu keeps a Redis list named after the queue)."""
    return [json.loads(raw) for raw in redis.Redis.from_url(redis_url).lrange(queue, 0, -1)]


def test_create_commits_then_really_enqueues_on_the_train_queue(tmp_path: Path, store_url: str,
                                                                 redis_url: str) -> None:
    settings = make_settings(tmp_path, store_url, broker_url=redis_url, result_backend=redis_url)
    with live_api(settings) as live:
        r = live.client(ALICE).post("/v1/jobs", json=job_body(settings))
        assert r.status_code == 201, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued" and job["attempt"] == 0 and job["error"] is None
        assert job["training"]["mask_ratio"] == 0.6 and job["training"]["base_lr"] == 1e-4  # defaults resolved
        assert job["metadata"] == {"team": "vision"} and job["created_at"].endswith("Z")
        assert job_ids(live.sessions) == {("alice", job["id"], "queued")}
    (message,) = [m for m in queued_messages(redis_url, "train") if job["id"] in base64.b64decode(m["body"]).decode()]
    assert message["headers"]["task"] == "simmim.pretrain"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [job["id"]] and kwargs == {}


def test_multi_gpu_jobs_go_to_the_queue_of_their_size_and_oversized_ones_are_refused(
        tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", broker_url=redis_url,
                             result_backend=redis_url, max_job_gpus=4)
    with live_api(settings) as live:
        body = job_body(settings)
        r = live.client(ALICE).post("/v1/jobs", json={**body, "training": {**body["training"], "gpus": 2}})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["training"]["gpus"] == 2
        too_big = live.client(ALICE).post("/v1/jobs", json={**body, "training": {**body["training"], "gpus": 5}})
        assert_problem(too_big, 422)
        assert "SIMMIM_MAX_JOB_GPUS" in too_big.text and "training.gpus" in too_big.text
    (message,) = [m for m in queued_messages(redis_url, "train.gpus2")
                  if job["id"] in base64.b64decode(m["body"]).decode()]
    assert message["headers"]["task"] == "simmim.pretrain"
    assert not [m for m in queued_messages(redis_url, "train") if job["id"] in base64.b64decode(m["body"]).decode()]


def test_broker_down_answers_503_and_leaves_the_job_queued(tmp_path: Path, store_url: str) -> None:
    settings = make_settings(tmp_path, store_url)  # broker_url points at a closed port
    with live_api(settings) as live:
        r = live.client(ALICE).post("/v1/jobs", json=job_body(settings), headers={"Idempotency-Key": "k1"})
        body = assert_problem(r, 503, "could not be queued", "Idempotency-Key")
        assert r.headers["retry-after"] == "5"
        assert job_ids(live.sessions) == {("alice", body["job_id"], "queued")}


def test_replay_after_503_enqueues_the_same_job(api: LiveApi, alice: httpx.Client, fake: FakeDispatcher) -> None:
    fake.broker_down = True
    body = job_body(api.settings)
    failed = assert_problem(alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me"}), 503)
    fake.broker_down = False
    r = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "retry-me"})
    assert r.status_code == 200 and r.json()["id"] == failed["job_id"]
    assert fake.pretrain == [failed["job_id"]]


def test_idempotency_replay_same_job_and_conflicting_reuse(api: LiveApi, alice: httpx.Client) -> None:
    body = job_body(api.settings)
    first = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 201
    explicit_defaults = {**body, "training": {**body["training"], "mask_ratio": 0.6, "seed": 0}}
    replay = alice.post("/v1/jobs", json=explicit_defaults, headers={"Idempotency-Key": "abc"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    changed = {**body, "name": "other"}
    assert_problem(alice.post("/v1/jobs", json=changed, headers={"Idempotency-Key": "abc"}), 422,
                   "different request body")
    # keys are per tenant: bob's "abc" is a new job
    assert api.client(BOB).post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc"}).status_code == 201
    assert len(job_ids(api.sessions)) == 2


def test_concurrent_idempotent_creates_make_one_job(api: LiveApi, alice: httpx.Client) -> None:
    body = job_body(api.settings)

    def post(_: int) -> httpx.Response:
        return alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "race"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(job_ids(api.sessions)) == 1


def test_pagination_newest_first_with_status_filter(api: LiveApi, alice: httpx.Client) -> None:
    ids = [seed_job(api.sessions) for _ in range(5)]
    seed_job(api.sessions, tenant="bob")
    seen, after, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = alice.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
    # newest first by id; ids are time-sortable to the millisecond (random order within one)
    assert seen == sorted(ids, reverse=True) and pages == 3
    alice.post(f"/v1/jobs/{ids[1]}/cancel").raise_for_status()
    cancelled = alice.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]] and cancelled["has_more"] is False


def test_job_shows_progress_metrics_attempts_and_error(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions)
    attempt = start(api.sessions, job_id)
    move(api.sessions, job_id, attempt, JobStatus.RUNNING)
    report(api.sessions, job_id, attempt, step=10, loss=0.5, lr=1e-4)
    job = alice.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "running" and job["attempt"] == 1 and job["started_at"]
    assert job["progress"]["step"] == 10 and job["progress"]["total_steps"] == 1000 and job["progress"]["loss"] == 0.5
    assert job["latest_metrics"] == {"loss": 0.5, "lr": 1e-4, "step": 10}
    assert [(a["number"], a["worker"], a["ended_at"]) for a in job["attempts"]] == [(1, "gpu-0", None)]
    move(api.sessions, job_id, attempt, JobStatus.FAILED, error_code="oom", error_message="CUDA out of memory")
    job = alice.get(f"/v1/jobs/{job_id}").json()
    assert job["error"] == {"code": "oom", "message": "CUDA out of memory"} and job["finished_at"]
    assert job["attempts"][0]["reason"] == "oom"


def test_tenants_never_see_each_others_jobs(api: LiveApi, alice: httpx.Client, bob: httpx.Client) -> None:
    job_id = alice.post("/v1/jobs", json=job_body(api.settings)).json()["id"]
    assert_problem(bob.get(f"/v1/jobs/{job_id}"), 404, job_id)
    assert_problem(bob.post(f"/v1/jobs/{job_id}/cancel"), 404)
    assert bob.get("/v1/jobs").json()["data"] == []
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 200


def test_cancel_queued_running_and_finished(api: LiveApi, alice: httpx.Client) -> None:
    queued = seed_job(api.sessions)
    running = seed_job(api.sessions, status=JobStatus.RUNNING)
    done = seed_job(api.sessions, status=JobStatus.SUCCEEDED)
    r = alice.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["cancel_requested"]
    assert alice.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelling"
    assert_problem(alice.post(f"/v1/jobs/{done}/cancel"), 409, "succeeded")
    assert_problem(alice.post(f"/v1/jobs/{queued}/cancel"), 409, "cancelled")


def test_metric_history_is_thinned_and_keeps_the_last_point(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.RUNNING)
    with api.sessions.begin() as s:
        from jobstore import repo

        for step in range(1, 301):
            repo.record_progress(s, job_id=job_id, attempt=1, progress={"step": step},
                                 metrics={"loss": 1.0 / step, "lr": 0.001})
    assert alice.get(f"/v1/jobs/{job_id}/metrics").json() == {"keys": ["loss", "lr"]}
    full = alice.get(f"/v1/jobs/{job_id}/metrics", params={"key": "loss"}).json()
    assert len(full["points"]) == 300
    thin = alice.get(f"/v1/jobs/{job_id}/metrics", params={"key": "loss", "max_points": 50}).json()
    steps = [p["step"] for p in thin["points"]]
    assert thin["key"] == "loss" and len(steps) == 50 and steps == sorted(steps)
    assert steps[0] == 1 and steps[-1] == 300
    assert thin["points"][-1]["value"] == pytest.approx(1 / 300) and thin["points"][0]["timestamp"].endswith("Z")
    assert alice.get(f"/v1/jobs/{job_id}/metrics", params={"key": "nope"}).json() == {"key": "nope", "points": []}


def test_without_auth_required_anonymous_callers_are_the_default_tenant(tmp_path: Path, store_url: str) -> None:
    settings = make_settings(tmp_path, store_url, auth_required=False, default_tenant="local")
    with live_api(settings, FakeDispatcher()) as live:
        anonymous = live.client(None)
        job_id = anonymous.post("/v1/jobs", json=job_body(settings)).json()["id"]
        assert anonymous.get(f"/v1/jobs/{job_id}").status_code == 200
        assert_problem(live.client("wrong").get("/v1/jobs"), 401, "invalid API key")
        assert job_ids(live.sessions) == {("local", job_id, "queued")}
