"""Server-Sent Events: a simulated worker writes through ``jobstore.repo`` while a client listens."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api.deps import StreamTiming, get_stream_timing
from jobstore.states import JobStatus
from tests.api.conftest import LiveApi, assert_problem
from tests.api.store import move, report, seed_job, start


@pytest.fixture(autouse=True)
def fast_stream(api: LiveApi) -> Iterator[None]:
    """Poll every 20 ms and keep alive every 0.3 s, so the tests take well under a second."""
    api.app.dependency_overrides[get_stream_timing] = lambda: StreamTiming(poll_s=0.02, keepalive_s=0.3)
    yield
    api.app.dependency_overrides.clear()


def read_events(client: httpx.Client, path: str, headers: dict[str, str] | None = None,
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """All SSE events of a stream (until the server ends it) and the comment lines seen."""
    events: list[dict[str, Any]] = []
    comments: list[str] = []
    current: dict[str, Any] = {}
    with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line == "":
                if "event" in current:
                    events.append(current)
                current = {}
            else:
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events, comments


def simulate_worker(api: LiveApi, job_id: str, delay: float = 0.1) -> threading.Thread:
    """Claim, report two steps, checkpoint-free success — with pauses so the stream must poll."""
    def run() -> None:
        time.sleep(delay)
        attempt = start(api.sessions, job_id)
        move(api.sessions, job_id, attempt, JobStatus.RUNNING)
        for step in (1, 2):
            time.sleep(delay)
            report(api.sessions, job_id, attempt, step=step, loss=1.0 / step)
        time.sleep(delay * 4)  # idle long enough for a keep-alive
        move(api.sessions, job_id, attempt, JobStatus.SUCCEEDED)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_stream_follows_a_job_to_the_end_then_resumes_from_last_event_id(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions)
    worker = simulate_worker(api, job_id)
    events, comments = read_events(alice, f"/v1/jobs/{job_id}/events")
    worker.join()
    kinds = [(e["event"], e["data"].get("status") or e["data"].get("step")) for e in events]
    assert kinds == [("status", "queued"), ("status", "validating"), ("status", "running"),
                     ("metrics", 1), ("metrics", 2), ("status", "succeeded")]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[3]["data"]["loss"] == 1.0 and events[0]["data"]["created_at"]
    assert ": keep-alive" in comments

    resumed, _ = read_events(alice, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[2])})
    assert [int(e["id"]) for e in resumed] == ids[3:]
    by_query, _ = read_events(alice, f"/v1/jobs/{job_id}/events?after={ids[4]}")
    assert [int(e["id"]) for e in by_query] == ids[5:]


def test_stream_of_a_finished_job_ends_at_once(api: LiveApi, alice: httpx.Client) -> None:
    job_id = seed_job(api.sessions, status=JobStatus.CANCELLED)
    started = time.monotonic()
    events, _ = read_events(alice, f"/v1/jobs/{job_id}/events")
    assert [e["data"]["status"] for e in events] == ["queued", "cancelled"]
    assert time.monotonic() - started < 2


def test_stream_of_another_tenants_job_is_not_found(api: LiveApi, bob: httpx.Client) -> None:
    job_id = seed_job(api.sessions)
    assert_problem(bob.get(f"/v1/jobs/{job_id}/events"), 404)


def test_an_open_stream_holds_no_database_connection(api: LiveApi, alice: httpx.Client) -> None:
    api.app.dependency_overrides[get_stream_timing] = lambda: StreamTiming(poll_s=1.0, keepalive_s=15)
    pool = api.app.state.sessions.kw["bind"].pool
    job_id = seed_job(api.sessions)
    with alice.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(5)][2:4] == ["id: 1", "event: status"]
        time.sleep(0.1)  # the stream now sleeps between polls
        assert pool.checkedout() == 0
