"""``GET /v1/jobs/{id}/events``: the job's events as Server-Sent Events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, SessionsDep, StreamTimingDep, TenantDep
from api.errors import ResponsesDoc, problem_responses
from api.services import jobs
from api.sse import event_stream

router = APIRouter(prefix="/v1/jobs", tags=["events"])
MAX_EVENT_ID = 2**63 - 1
"""Event ids are 64-bit integers in the store; a larger resume point is a 422, not a driver overflow."""
SSE_EVENT = {  # OpenAPI 3.1: the schema of a text/event-stream describes one event
    "type": "object", "title": "JobEventMessage", "required": ["data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "Event id; resume with Last-Event-ID"},
        "event": {"type": "string", "enum": ["status", "metrics", "checkpoint", "log"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "The event as JSON, with its created_at"},
        "retry": {"type": "integer", "minimum": 0, "description": "Reconnection delay in milliseconds"},
    },
}
SSE_DOC: ResponsesDoc = {200: {"description": "An SSE stream: `id: <event id>`, `event: status|metrics|checkpoint|log`, "
                                "`data: <json>`; it ends after the job's terminal event",
                 "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={**SSE_DOC, **problem_responses(401, 404, 422)})
def job_events(job_id: str, session: SessionDep, sessions: SessionsDep, tenant: TenantDep,
               timing: StreamTimingDep,
               last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_EVENT_ID)] = None,
               after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="Resume after this event id")] = None,
               ) -> StreamingResponse:
    """Stream status, metrics, checkpoint and log events; resumes after ``Last-Event-ID``."""
    jobs.get_job(session=session, tenant=tenant, job_id=job_id)
    start = last_event_id if last_event_id is not None else (after or 0)
    return StreamingResponse(event_stream(sessions, job_id, start, timing), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
