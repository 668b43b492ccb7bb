"""Liveness, readiness (real broker up and down), Prometheus metrics, and unexpected errors."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.api.conftest import ALICE, LiveApi, assert_problem, job_body, live_api, make_settings
from tests.api.fakes import FakeDispatcher
from tests.api.store import seed_job


def test_healthz_needs_nothing(api: LiveApi) -> None:
    r = api.client(None).get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_with_a_live_broker(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", broker_url=redis_url,
                             result_backend=redis_url)
    with live_api(settings) as live:
        r = live.client(None).get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "artifacts": "ok"}}


def test_readyz_is_503_quickly_when_the_broker_is_down(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")  # broker on a closed port
    with live_api(settings) as live:
        started = time.monotonic()
        r = live.client(None).get("/readyz")
        assert time.monotonic() - started < 5
        body = assert_problem(r, 503, "broker (unreachable)")
        assert body["checks"] == {"database": "ok", "broker": "unreachable", "artifacts": "ok"}


def test_prometheus_metrics_by_route_template_and_jobs_by_status(api: LiveApi, alice: httpx.Client) -> None:
    seed_job(api.sessions)
    job_id = alice.post("/v1/jobs", json=job_body(api.settings)).json()["id"]
    alice.get(f"/v1/jobs/{job_id}")
    alice.get("/v1/jobs/job_00000000000000000000")
    r = api.client(None).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'simmim_http_requests_total{method="POST",route="/v1/jobs",status="201"} 1.0' in text
    assert 'simmim_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'simmim_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert job_id not in text  # no raw paths as labels
    assert 'simmim_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/jobs"}' in text
    assert 'simmim_jobs{status="queued"} 2.0' in text and 'simmim_jobs{status="running"} 0.0' in text


class ExplodingDispatcher(FakeDispatcher):
    def ping(self) -> bool:
        raise RuntimeError("password=hunter2 leaked from a driver")


def test_unexpected_errors_are_a_generic_500_problem(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    with live_api(settings, ExplodingDispatcher()) as live:
        r = live.client(ALICE).get("/readyz")
        body = assert_problem(r, 500, "internal error")
        assert "hunter2" not in r.text and "Traceback" not in r.text and set(body) == {
            "type", "title", "status", "detail", "instance"}
        assert live.client(ALICE).get("/healthz").status_code == 200
