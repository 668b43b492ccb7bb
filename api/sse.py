"""Server-Sent Events for ``GET /v1/jobs/{id}/events``: one SSE event per ``job_events`` row.

The stream polls the job store (``StreamTiming.poll_s``, 0.5 s) in a worker thread with a
short session per poll, sends ``: keep-alive`` comments when idle (every 15 s), and ends once
the job is terminal and every event up to that point has been sent. Each event carries its
row id as ``id:``, so a reconnecting client resumes with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from sqlalchemy.orm import Session, sessionmaker

from api.deps import StreamTiming
from jobstore import repo
from jobstore.models import JobEvent
from jobstore.states import TERMINAL, JobStatus

BATCH = 500


def format_event(event: JobEvent) -> str:
    """``id``/``event``/``data`` lines; ``data`` is the row's JSON plus its ``created_at``."""
    data: dict[str, Any] = {**event.data, "created_at": event.created_at.isoformat()}
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def poll(sessions: sessionmaker[Session], job_id: str, after_id: int) -> tuple[list[JobEvent], bool]:
    """Events after ``after_id`` and whether the job was already terminal before they were read.

    The status is read first: events written with a terminal status are in the same commit,
    so when it is terminal the event list that follows is complete.
    """
    with sessions() as session:
        finished = JobStatus(repo.get_job(session, job_id=job_id).status) in TERMINAL
        return repo.list_events(session, job_id=job_id, after_id=after_id, limit=BATCH), finished


async def event_stream(sessions: sessionmaker[Session], job_id: str, after_id: int,
                       timing: StreamTiming) -> AsyncIterator[str]:
    """The SSE body; it ends after the terminal event (or when the client goes away)."""
    yield "retry: 2000\n\n"
    last_sent = time.monotonic()
    while True:
        events, finished = await anyio.to_thread.run_sync(poll, sessions, job_id, after_id)
        for event in events:
            after_id = event.id
            yield format_event(event)
        if len(events) == BATCH:
            continue
        if finished:
            return
        if events:
            last_sent = time.monotonic()
        if time.monotonic() - last_sent >= timing.keepalive_s:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(timing.poll_s)
