"""Webhooks: a local HTTP receiver gets signed terminal events, retried with backoff on failures.

The receiver is a threaded ``http.server`` on loopback; the API is the real app over uvicorn
with its deliverer thread. Jobs are moved to their terminal state through ``jobstore.repo``
(as a worker does), so the outbox row is written in the worker's transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from jobstore import repo
from jobstore.states import JobStatus
from simmim_service.addresses import is_public
from simmim_service.webhooks import sign, verify
from tests.api.conftest import ALICE, assert_problem, job_body, live_api, make_settings
from tests.api.fakes import FakeDispatcher
from tests.api.store import move, report, start
from tests.services import sqlite_or_postgres

SECRET = "whsec-0123456789abcdef-do-not-leak"


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers the queued statuses in order (then the last one forever) and records each request."""

    url: str
    statuses: list[int]
    requests: list[Received] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"got {len(self.requests)} of {count} deliveries"
            time.sleep(0.02)
        return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box = Receiver(url="", statuses=[500, 500, 200])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            box.requests.append(Received(time.monotonic(), dict(self.headers.items()), body))
            status = box.statuses[min(len(box.requests), len(box.statuses)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/simmim?team=vision"
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from sqlite_or_postgres(request.param, tmp_path)


def test_signed_event_retried_on_500_with_backoff_until_delivered(
        tmp_path: Path, store_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, store_url, webhook_backoff_s=0.4, webhook_max_attempts=5,
                             webhook_timeout_s=5.0)
    with live_api(settings, FakeDispatcher()) as api:
        alice = api.client(ALICE)
        body = {**job_body(settings), "webhook": {"url": receiver.url, "secret": SECRET}}
        created = alice.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        attempt = start(api.sessions, job_id)
        move(api.sessions, job_id, attempt, JobStatus.RUNNING)
        report(api.sessions, job_id, attempt, step=1000, loss=0.25)
        move(api.sessions, job_id, attempt, JobStatus.SUCCEEDED)

        got = receiver.wait_for(3)
        time.sleep(1.0)  # a 4th POST would be a bug: the 3rd was answered 200
        assert len(receiver.requests) == 3
        ids = {r.headers["X-SimMIM-Event-Id"] for r in got}
        assert len(ids) == 1, "every retry carries the same event id"
        event_id = ids.pop()
        for r in got:
            stamp = r.headers["X-SimMIM-Timestamp"]
            expected = "v1=" + hmac.new(SECRET.encode(), f"{event_id}.{stamp}.".encode() + r.body,
                                        hashlib.sha256).hexdigest()
            assert r.headers["X-SimMIM-Signature"] == expected
            assert verify(SECRET, r.headers, r.body)
            assert not verify("another-secret-of-16+", r.headers, r.body)
            assert not verify(SECRET, r.headers, r.body.replace(b"succeeded", b"failed"))
            assert r.headers["Content-Type"] == "application/json"
        gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
        assert gaps[0] >= 0.4 * 0.9 and gaps[1] >= 0.8 * 0.9, gaps  # 0.4 s, then doubled
        assert gaps[1] > gaps[0]

        event = json.loads(got[-1].body)
        assert event["id"] == event_id and event_id.startswith("whd_")
        assert event["type"] == "job.succeeded" and event["created_at"]
        data = event["data"]
        assert data["job_id"] == job_id and data["status"] == "succeeded" and data["error"] is None
        assert data["progress"]["step"] == 1000 and data["latest_metrics"]["loss"] == 0.25
        assert data["name"] == "tiny" and data["metadata"] == {"team": "vision"} and data["finished_at"]

        with api.sessions() as s:
            (delivery,) = repo.list_webhook_deliveries(s, job_id=job_id)
            assert delivery.id == event_id and delivery.status == "delivered" and delivery.attempts == 3
            assert delivery.delivered_at is not None and delivery.last_error is None

        for text in (alice.get(f"/v1/jobs/{job_id}").text, alice.get("/v1/jobs").text):
            assert SECRET not in text
    assert not [r for r in caplog.records if SECRET in r.getMessage()], "the secret was logged"


def test_gives_up_after_max_attempts_and_says_so_on_the_job(tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses = [500]
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", webhook_backoff_s=0.1,
                             webhook_max_attempts=3)
    with live_api(settings, FakeDispatcher()) as api:
        alice = api.client(ALICE)
        body = {**job_body(settings), "webhook": {"url": receiver.url, "secret": SECRET}}
        job_id = alice.post("/v1/jobs", json=body).json()["id"]
        assert alice.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # queued: at once
        receiver.wait_for(3)
        deadline = time.monotonic() + 10
        while True:
            with api.sessions() as s:
                (delivery,) = repo.list_webhook_deliveries(s, job_id=job_id)
                logs = [e.data for e in repo.list_events(s, job_id=job_id) if e.type == "log"]
            if delivery.status == "failed" and logs:
                break
            assert time.monotonic() < deadline, (delivery.status, logs)
            time.sleep(0.05)
        time.sleep(0.5)
        assert len(receiver.requests) == 3
        assert delivery.attempts == 3 and delivery.last_error == "HTTP 500" and delivery.next_attempt_at is None
        assert json.loads(receiver.requests[0].body)["type"] == "job.cancelled"
        assert logs[0]["level"] == "warning" and "giving up" in logs[0]["message"]
        assert "127.0.0.1" in logs[0]["message"] and SECRET not in json.dumps(logs)


def test_unreachable_receiver_is_retried_like_an_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", webhook_backoff_s=0.1,
                             webhook_max_attempts=2, webhook_timeout_s=1.0)
    with live_api(settings, FakeDispatcher()) as api:
        alice = api.client(ALICE)
        body = {**job_body(settings), "webhook": {"url": "http://127.0.0.1:9/nothing-listens", "secret": SECRET}}
        job_id = alice.post("/v1/jobs", json=body).json()["id"]
        alice.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        deadline = time.monotonic() + 10
        while True:
            with api.sessions() as s:
                (delivery,) = repo.list_webhook_deliveries(s, job_id=job_id)
            if delivery.status == "failed":
                break
            assert time.monotonic() < deadline, delivery.status
            time.sleep(0.05)
        assert delivery.attempts == 2 and "ConnectError" in (delivery.last_error or "")


def test_secret_is_write_only_and_only_http_urls_are_accepted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    with live_api(settings, FakeDispatcher()) as api:
        alice = api.client(ALICE)
        for url in ("ftp://example.com/hook", "file:///etc/passwd", "gopher://127.0.0.1:6379/_", "not a url"):
            bad = alice.post("/v1/jobs", json={**job_body(settings), "webhook": {"url": url, "secret": SECRET}})
            problem = assert_problem(bad, 422, "webhook.url")
            assert SECRET not in bad.text, problem
        short = alice.post("/v1/jobs", json={**job_body(settings),
                                             "webhook": {"url": "https://example.com/h", "secret": "short"}})
        assert_problem(short, 422, "webhook.secret")
        extra = alice.post("/v1/jobs", json={**job_body(settings), "webhook": {
            "url": "https://example.com/h", "secret": SECRET, "events": ["job.succeeded"]}})
        assert_problem(extra, 422, "webhook.events")

        ok = alice.post("/v1/jobs", json={**job_body(settings),
                                          "webhook": {"url": "https://example.com/h", "secret": SECRET}})
        assert ok.status_code == 201, ok.text
        assert SECRET not in ok.text
        assert SECRET not in alice.get(f"/v1/jobs/{ok.json()['id']}").text
        schema = alice.get("/openapi.json").json()["components"]["schemas"]["WebhookSpec"]
        assert schema["properties"]["secret"]["writeOnly"] is True
        with api.sessions() as s:  # stored to sign deliveries, nothing is queued before the job ends
            job = repo.get_job(s, job_id=ok.json()["id"])
            assert job.webhook == {"url": "https://example.com/h", "secret": SECRET}
            assert repo.list_webhook_deliveries(s, job_id=job.id) == []


def test_outbox_row_shares_the_status_change_transaction(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    with live_api(settings, FakeDispatcher()) as api:
        with api.sessions.begin() as s:
            job, _ = repo.create_job(s, tenant="alice", spec={"dataset": "/d", "training": {}},
                                     webhook={"url": "http://127.0.0.1:9/h", "secret": SECRET})
            job_id = job.id
        with pytest.raises(RuntimeError), api.sessions.begin() as s:
            repo.request_cancel(s, job_id=job_id)
            assert len(repo.list_webhook_deliveries(s, job_id=job_id)) == 1
            raise RuntimeError("roll back")
        with api.sessions() as s:
            assert repo.get_job(s, job_id=job_id).status == JobStatus.QUEUED
            assert repo.list_webhook_deliveries(s, job_id=job_id) == []
        with api.sessions.begin() as s:  # no webhook: no row
            plain, _ = repo.create_job(s, tenant="alice", spec={"dataset": "/d", "training": {}})
            repo.request_cancel(s, job_id=plain.id)
            assert repo.list_webhook_deliveries(s, job_id=plain.id) == []


def test_signature_recipe_matches_the_readme() -> None:
    """The receiver-side snippet in README.md, run against ``sign``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start_at = readme.index("import hashlib, hmac, time")
    snippet = readme[start_at:readme.index("```", start_at)]
    scope: dict[str, Any] = {}
    exec(snippet, scope)
    body = b'{"id":"whd_1","type":"job.failed"}'
    stamp = str(int(time.time()))
    headers = {"X-SimMIM-Event-Id": "whd_1", "X-SimMIM-Timestamp": stamp,
               "X-SimMIM-Signature": sign(SECRET, "whd_1", stamp, body)}
    assert scope["verify_simmim_webhook"](SECRET, headers, body) is True
    assert scope["verify_simmim_webhook"](SECRET, headers, body + b" ") is False
    old = {**headers, "X-SimMIM-Timestamp": str(int(time.time()) - 3600)}
    old["X-SimMIM-Signature"] = sign(SECRET, "whd_1", old["X-SimMIM-Timestamp"], body)
    assert scope["verify_simmim_webhook"](SECRET, old, body) is False


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("::1", False),
    ("10.1.2.3", False), ("172.20.0.5", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("fd00::1", False),
    ("fe80::1%eth0", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
])
def test_which_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_without_private_addresses_the_api_refuses_internal_hooks(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", webhook_allow_private=False)
    with live_api(settings, FakeDispatcher()) as api:
        alice = api.client(ALICE)
        for url, words in [("http://127.0.0.1:6379/", "127.0.0.1 is not a public address"),
                           ("http://localhost:8000/hook", "localhost resolves to"),
                           ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public"),
                           ("http://[::1]:9/h", "::1 is not a public address"),
                           ("http://0x7f000001/", "is not a public address")]:
            refused = alice.post("/v1/jobs", json={**job_body(settings), "webhook": {"url": url, "secret": SECRET}})
            problem = assert_problem(refused, 422, "webhook.url")
            assert words in refused.text and "SIMMIM_WEBHOOK_ALLOW_PRIVATE" in refused.text, problem
        with api.sessions() as s:
            assert repo.list_jobs(s, tenant="alice") == ([], False)


def test_delivery_never_connects_to_a_private_address_when_they_are_not_allowed(
        tmp_path: Path, receiver: Receiver) -> None:
    """The address is checked again at delivery (the name may resolve differently by then)."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", webhook_backoff_s=0.1,
                             webhook_max_attempts=2, webhook_allow_private=False)
    with live_api(settings, FakeDispatcher()) as api:
        with api.sessions.begin() as s:  # as if the API had let it through
            job, _ = repo.create_job(s, tenant="alice", spec={"dataset": "/d", "training": {}},
                                     webhook={"url": receiver.url, "secret": SECRET})
            repo.request_cancel(s, job_id=job.id)
        deadline = time.monotonic() + 10
        while True:
            with api.sessions() as s:
                (delivery,) = repo.list_webhook_deliveries(s, job_id=job.id)
            if delivery.status == "failed":
                break
            assert time.monotonic() < deadline, delivery.status
            time.sleep(0.05)
        assert "127.0.0.1 is not a public address" in (delivery.last_error or ""), delivery.last_error
        assert receiver.requests == []
