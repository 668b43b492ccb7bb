"""Rate limits per tenant (token bucket, 429 + Retry-After) and the active-job quota, over real HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from api.rate_limit import MAX_BUCKETS, TokenBuckets
from jobstore.states import JobStatus
from tests.api.conftest import ALICE, BOB, assert_problem, job_body, live_api, make_settings
from tests.api.fakes import FakeDispatcher
from tests.api.store import seed_job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_refill_and_wait() -> None:
    clock = Clock()
    buckets = TokenBuckets(per_minute=60, burst=3, clock=clock)  # 1 token per second
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)
    assert buckets.take("b") == 0.0  # buckets are independent
    clock.now += 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    clock.now += 3600
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refills only up to the burst


def test_token_buckets_stay_bounded() -> None:
    clock = Clock()
    buckets = TokenBuckets(per_minute=600, burst=5, clock=clock)
    for i in range(MAX_BUCKETS + 50):
        buckets.take(f"client:{i}")
        clock.now += 1.0  # every earlier bucket is full again by now
    assert len(buckets.buckets) <= MAX_BUCKETS


def test_rate_limit_per_tenant_with_retry_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", rate_limit_per_minute=60,
                             rate_limit_burst=3, api_keys={ALICE: "alice", "key-alice-second-0123": "alice",
                                                           BOB: "bob"})
    with live_api(settings, FakeDispatcher()) as live:
        alice, alice2, bob = live.client(ALICE), live.client("key-alice-second-0123"), live.client(BOB)
        assert [alice.get("/v1/jobs").status_code for _ in range(3)] == [200, 200, 200]
        r = alice2.get("/v1/jobs")  # another key of the same tenant shares its budget
        body = assert_problem(r, 429, "rate limit exceeded for tenant 'alice'", "60 requests per minute",
                              "bursts of 3", "SIMMIM_RATE_LIMIT_PER_MINUTE")
        assert body["type"] == "urn:simmim:problem:too-many-requests"
        assert r.headers["Retry-After"] == "1"
        assert ALICE not in r.text and "key-alice-second" not in r.text
        assert alice.post("/v1/jobs", json=job_body(settings)).status_code == 429  # before the body matters
        assert bob.get("/v1/jobs").status_code == 200  # other tenants are not affected
        for path in ("/healthz", "/readyz", "/metrics"):  # probes are never limited
            assert all(alice.get(path).status_code in (200, 503) for _ in range(5)), path
        time.sleep(1.1)
        assert alice.get("/v1/jobs").status_code == 200
        metrics = live.client(None).get("/metrics").text
        assert 'simmim_http_requests_total{method="GET",route="<unmatched>",status="429"} 1.0' in metrics


def test_unknown_keys_and_anonymous_clients_are_limited_by_address(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", rate_limit_per_minute=6,
                             rate_limit_burst=2)
    with live_api(settings, FakeDispatcher()) as live:
        guesser = live.client("not-a-key-0000")
        assert [guesser.get("/v1/jobs").status_code for _ in range(2)] == [401, 401]
        r = live.client(None).get("/v1/jobs")
        assert_problem(r, 429, "unauthenticated client 127.0.0.1")
        assert int(r.headers["Retry-After"]) == 10  # 6/min: one token every 10 s
        assert live.client(ALICE).get("/v1/jobs").status_code == 200  # a valid key has its own budget


def test_embedded_mode_limits_the_default_tenant(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", api_keys={}, auth_required=False,
                             rate_limit_per_minute=60, rate_limit_burst=2)
    with live_api(settings, FakeDispatcher()) as live:
        anonymous = live.client(None)
        assert [anonymous.get("/v1/jobs").status_code for _ in range(2)] == [200, 200]
        assert_problem(anonymous.get("/v1/jobs"), 429, "tenant 'local'")


def test_rate_limit_zero_turns_it_off(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", rate_limit_per_minute=0,
                             rate_limit_burst=1)
    with live_api(settings, FakeDispatcher()) as live:
        alice = live.client(ALICE)
        assert {alice.get("/v1/jobs").status_code for _ in range(10)} == {200}


def test_active_job_quota(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", max_active_jobs_per_tenant=2)
    fake = FakeDispatcher()
    with live_api(settings, fake) as live:
        alice, bob = live.client(ALICE), live.client(BOB)
        seed_job(live.sessions, tenant="alice", status=JobStatus.SUCCEEDED)  # finished jobs do not count
        seed_job(live.sessions, tenant="alice", status=JobStatus.FAILED)
        first = alice.post("/v1/jobs", json=job_body(settings), headers={"Idempotency-Key": "one"})
        second = alice.post("/v1/jobs", json=job_body(settings))
        assert (first.status_code, second.status_code) == (201, 201)

        r = alice.post("/v1/jobs", json=job_body(settings), headers={"Idempotency-Key": "three"})
        body = assert_problem(r, 429, "tenant 'alice' already has 2 active jobs", "the limit is 2",
                              "SIMMIM_MAX_ACTIVE_JOBS_PER_TENANT", "cancel one")
        assert r.headers["Retry-After"] == "60"
        assert (body["active_jobs"], body["max_active_jobs"]) == (2, 2)
        assert len(alice.get("/v1/jobs").json()["data"]) == 4 and len(fake.pretrain) == 2  # nothing stored

        replay = alice.post("/v1/jobs", json=job_body(settings), headers={"Idempotency-Key": "one"})
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]  # a replay is no new job
        assert alice.post("/v1/jobs", json={"dataset": 5}).status_code == 422  # a bad body is still a 422

        assert bob.post("/v1/jobs", json=job_body(settings)).status_code == 201  # per tenant
        assert alice.post(f"/v1/jobs/{second.json()['id']}/cancel").json()["status"] == "cancelled"
        assert alice.post("/v1/jobs", json=job_body(settings), headers={"Idempotency-Key": "three"}
                          ).status_code == 201


def test_429_is_documented_on_every_v1_operation(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    with live_api(settings, FakeDispatcher()) as live:
        doc = live.client(None).get("/openapi.json").json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert "Retry-After" in operation["responses"]["429"]["headers"], (method, path)
            else:
                assert "429" not in operation["responses"], (method, path)
