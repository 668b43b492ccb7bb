"""No secret leaves the API: neither the job store's or the broker's password nor any API key
appears in a response body or in what the API logs, whatever goes wrong.

The store and the broker are configured with passwords and are unreachable (closed ports), so
readiness fails, job reads fail with a driver error (500), job creation cannot queue (503),
and the app cannot even start once migrations need the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import api.main
from simmim_service.settings import Settings
from tests.api.conftest import ALICE, BOB, assert_problem, job_body, live_api, make_settings
from tests.services import free_port

DB_PASSWORD = "pg-Sup3r-s3cret-Pa55"
BROKER_PASSWORD = "redis-s3cret-Pa55w0rd"
SECRETS = (DB_PASSWORD, BROKER_PASSWORD, ALICE, BOB)


def secret_settings(tmp_path: Path, **overrides: object) -> Settings:
    closed = free_port()
    broker = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{closed}/0"
    values: dict[str, object] = {
        "broker_url": broker, "result_backend": broker, "rate_limit_per_minute": 60, "rate_limit_burst": 5,
        "embed_timeout_s": 1.0}
    values.update(overrides)
    return make_settings(tmp_path, f"postgresql+psycopg://simmim:{DB_PASSWORD}@127.0.0.1:{closed}/simmim",
                         **values)


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}: {text[:2000]}"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def test_no_secret_in_bodies_or_logs_when_store_and_broker_are_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(api.main, "migrate", lambda engine: None)  # start although the store is down
    settings = secret_settings(tmp_path)
    responses: list[httpx.Response] = []
    with live_api(settings) as live:  # the real Celery dispatcher, on a password-protected, closed broker
        alice = live.client(ALICE)
        responses.append(r := live.client(None).get("/readyz"))
        assert_problem(r, 503, "database (unreachable: OperationalError)", "broker (unreachable)")
        responses.append(r := alice.get("/v1/jobs"))
        assert_problem(r, 500, "internal error")
        responses.append(r := alice.post("/v1/jobs", json=job_body(settings)))
        assert r.status_code in (500, 503), r.text
        responses.append(r := alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}))
        assert_problem(r, 422, "malformed JSON")
        responses.append(r := alice.post("/v1/jobs", content=b"{\"a\": \"\xff\"}", headers={"Content-Type": "application/json"}))
        assert_problem(r, 400, "cannot be parsed")
        responses.append(r := live.client(ALICE[:-1] + "X").get("/v1/jobs"))  # a near miss of a real key
        assert_problem(r, 401, "invalid API key")
        responses.append(r := live.client(None).get("/v1/jobs", headers={"Authorization": f"Token {BOB}"}))
        assert_problem(r, 401, "malformed Authorization header")
        responses.append(r := live.client(BOB).post("/v1/jobs/job_00000000000000000000/embeddings",
                                                    json={"images": ["AAAA"]}))
        assert r.status_code in (422, 500), r.text
        for _ in range(6):
            responses.append(r := live.client(BOB).get("/v1/jobs/job_00000000000000000000"))
        assert_problem(r, 429, "tenant 'bob'")
        responses.append(live.client(None).get("/metrics"))
    for response in responses:
        assert_no_secret(response.text, f"the body of {response.request.method} {response.request.url.path}")
        assert_no_secret(str(response.headers), "response headers")
    assert "unhandled error on GET /v1/jobs" in logs.text  # the 500 was logged, with its traceback
    assert_no_secret(logs.text, "the API's logs")
    assert_no_secret("\n".join(str(record.__dict__) for record in logs.records), "log records")
    out, err = capfd.readouterr()  # uvicorn's own loggers write to stderr, not through the root logger
    assert "Exception in ASGI application" not in err  # a 500 is logged once, by the API
    assert_no_secret(out + err, "the server's output")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's SystemExit(3)
def test_no_secret_in_logs_when_the_store_is_down_at_startup(
        tmp_path: Path, logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    settings = secret_settings(tmp_path)
    with pytest.raises(RuntimeError, match="did not start"), live_api(settings):
        pass
    out, err = capfd.readouterr()
    assert "Application startup failed" in err and "OperationalError" in err, err[-3000:]
    assert_no_secret(logs.text + out + err, "the startup logs")
