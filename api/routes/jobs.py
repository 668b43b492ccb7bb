"""``/v1/jobs``: create, list, read and cancel pretraining jobs, and read their metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response, status

from api.deps import DispatcherDep, SessionDep, SettingsDep, TenantDep
from api.errors import problem_responses
from api.schemas.jobs import JobPublic, JobsPublic, MetricHistory, MetricKeys
from api.services import jobs
from jobstore.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JOB_ID = r"^job_[0-9a-z]{20}$"
JOB_CREATE_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}}}}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                              description="Replays return the first job; reuse with "
                                                          "another body is a 422")]


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=JOB_CREATE_DOC,
             responses={200: {"model": JobPublic, "description": "Replay of an Idempotency-Key"},
                        **problem_responses(401, 413, 422, 503)})  # 429 (rate, quota): api.openapi
def create_job(body: Annotated[dict[str, Any], Body()], response: Response, session: SessionDep, tenant: TenantDep,
               settings: SettingsDep, dispatcher: DispatcherDep,
               idempotency_key: IdempotencyKey = None) -> JobPublic:
    """Validate a ``JobCreate`` (one 422 lists every problem), store the job, then queue it.

    429 when the tenant already has ``max_active_jobs_per_tenant`` unfinished jobs (an
    ``Idempotency-Key`` replay of an existing job is still answered with that job)."""
    job, created = jobs.create_job(session=session, dispatcher=dispatcher, settings=settings, tenant=tenant,
                                   raw=body, idempotency_key=idempotency_key)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return jobs.job_public(session=session, job=job)


@router.get("", responses=problem_responses(401, 422))
def list_jobs(session: SessionDep, tenant: TenantDep,
              limit: Annotated[int, Query(ge=1, le=100, description="Page size")] = 20,
              after: Annotated[str | None, Query(pattern=JOB_ID, description="next_after of the previous page")] = None,
              status: Annotated[JobStatus | None, Query(description="Only jobs in this state")] = None) -> JobsPublic:
    """The caller's jobs, newest first, a page at a time."""
    return jobs.list_jobs(session=session, tenant=tenant, limit=limit, after=after, status=status)


@router.get("/{job_id}", responses=problem_responses(401, 404, 422))
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Status, progress, latest metrics, error and attempts of one job."""
    job = jobs.get_job(session=session, tenant=tenant, job_id=job_id)
    return jobs.job_public(session=session, job=job)


@router.post("/{job_id}/cancel", responses=problem_responses(401, 404, 409, 422))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Queued jobs are cancelled at once; running ones become ``cancelling`` until the worker stops."""
    job = jobs.cancel_job(session=session, tenant=tenant, job_id=job_id)
    return jobs.job_public(session=session, job=job)


@router.get("/{job_id}/metrics", responses=problem_responses(401, 404, 422))
def job_metrics(job_id: str, session: SessionDep, tenant: TenantDep,
                key: Annotated[str | None, Query(max_length=100, description="e.g. loss, lr")] = None,
                max_points: Annotated[int, Query(ge=1, le=10000)] = 500) -> MetricHistory | MetricKeys:
    """One metric's history (thinned to ``max_points``), or without ``key`` the keys there are."""
    if key is None:
        return jobs.metric_keys(session=session, tenant=tenant, job_id=job_id)
    return jobs.metric_history(session=session, tenant=tenant, job_id=job_id, key=key, max_points=max_points)
