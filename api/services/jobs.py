"""Job use cases: create (validate, commit, then enqueue), list, read, cancel, metrics.

Every read and write goes through ``jobstore.repo``; these functions own the transaction
(commit after writes) and raise ``api.errors`` problems or ``jobstore.repo`` errors.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import defaultdict
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.dispatch import Dispatcher
from api.errors import (
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
    field_problems,
    validation_detail,
)
from api.schemas.jobs import JobPublic, JobsPublic, MetricHistory, MetricKeys, MetricPointPublic
from jobstore import repo
from jobstore.models import Job
from jobstore.states import TERMINAL, JobStatus
from simmim_service.settings import Settings
from simmim_service.spec import JobCreate, TrainingSpec, check_dataset, check_job, check_training


def request_hash(body: JobCreate) -> str:
    """Fingerprint of the resolved body: the same request with or without explicit defaults matches."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_job(raw: dict[str, Any], settings: Settings) -> JobCreate:
    """The validated body, or one 422 listing every problem: schema errors and, as far as the
    body can be read, the dataset and model checks too (so one round trip shows everything)."""
    try:
        body = JobCreate.model_validate(raw)
    except ValidationError as err:
        problems = field_problems(list(err.errors()))
        problems += _checks_on_parts(raw, settings, known={p["field"] for p in problems})
        raise Unprocessable(validation_detail(problems), errors=problems) from err
    problems = check_job(body, settings)
    if problems:
        raise Unprocessable(validation_detail(problems), errors=problems)
    return body


def _checks_on_parts(raw: dict[str, Any], settings: Settings, known: set[str]) -> list[dict[str, str]]:
    """``check_job``'s dataset and model checks on a body that failed schema validation."""
    problems: list[dict[str, str]] = []
    if isinstance(raw.get("dataset"), str) and raw["dataset"] and "dataset" not in known:
        problems += check_dataset(raw["dataset"], settings)
    training = raw.get("training")
    model = training.get("model") if isinstance(training, dict) else None
    if isinstance(model, str) and "training.model" not in known:
        problems += [p for p in check_training(TrainingSpec.model_construct(model=model))
                     if p["field"] == "training.model"]
    return problems


QUOTA_RETRY_AFTER_S = 60
"""``Retry-After`` of a quota 429: jobs take minutes at least, so asking again sooner is pointless."""

# Serialises "count active jobs, then insert" per tenant within this API process, so concurrent
# creates cannot overshoot the quota here (with several replicas it may be exceeded by up to
# replicas - 1 jobs).
_quota_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_quota_locks_guard = threading.Lock()


def _quota_lock(tenant: str) -> threading.Lock:
    with _quota_locks_guard:
        return _quota_locks[tenant]


def active_job_count(session: Session, tenant: str) -> int:
    """The tenant's jobs that are not finished (queued, validating, running, cancelling, recovering)."""
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant == tenant, Job.status.not_in([s.value for s in TERMINAL]))) or 0)


def _check_quota(session: Session, *, settings: Settings, tenant: str, idempotency_key: str | None) -> None:
    """429 when the tenant already has ``max_active_jobs_per_tenant`` unfinished jobs.

    A replay of an existing idempotency key is never refused: it creates nothing.
    """
    if idempotency_key is not None and session.scalar(select(Job.id).where(
            Job.tenant == tenant, Job.idempotency_key == idempotency_key)) is not None:
        return
    limit = settings.max_active_jobs_per_tenant
    active = active_job_count(session, tenant)
    if active >= limit:
        raise TooManyRequests(
            f"tenant {tenant!r} already has {active} active jobs (queued or running); the limit is {limit} "
            "(SIMMIM_MAX_ACTIVE_JOBS_PER_TENANT). Wait for one to finish, or cancel one, then retry.",
            retry_after=QUOTA_RETRY_AFTER_S, active_jobs=active, max_active_jobs=limit)


def create_job(*, session: Session, dispatcher: Dispatcher, settings: Settings, tenant: str,
               raw: dict[str, Any], idempotency_key: str | None) -> tuple[Job, bool]:
    """Validate, check the quota, commit a queued job, then enqueue it. Returns (job, created).

    A replay (same ``idempotency_key``, same body) returns the first job; if that job is still
    ``queued`` and never started it is enqueued again, which is how a client recovers from a
    503 (a duplicate message is harmless: ``repo.start_attempt`` lets only one attempt run).
    If the broker is down the job stays ``queued`` and a 503 names it. A tenant with
    ``max_active_jobs_per_tenant`` unfinished jobs gets a 429 (replays excepted).
    """
    body = parse_job(raw, settings)
    with _quota_lock(tenant):
        _check_quota(session, settings=settings, tenant=tenant, idempotency_key=idempotency_key)
        try:
            job, created = _insert(session, tenant=tenant, body=body, idempotency_key=idempotency_key)
        except IntegrityError:  # a concurrent request inserted the same idempotency key first
            session.rollback()
            job, created = _insert(session, tenant=tenant, body=body, idempotency_key=idempotency_key)
    if created or (job.status == JobStatus.QUEUED and job.attempt == 0):
        _enqueue(dispatcher, job.id, body.training.gpus)
        repo.mark_dispatched(session, job_id=job.id)
        session.commit()
    return job, created


def _insert(session: Session, *, tenant: str, body: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
    job, created = repo.create_job(
        session, tenant=tenant, spec=body.model_dump(mode="json", include={"dataset", "training"}),
        name=body.name, metadata=dict(body.metadata), idempotency_key=idempotency_key,
        request_hash=request_hash(body), webhook=body.webhook.model_dump(mode="json") if body.webhook else None)
    session.commit()
    return job, created


def _enqueue(dispatcher: Dispatcher, job_id: str, gpus: int) -> None:
    try:
        dispatcher.enqueue_pretrain(job_id, gpus)
    except ServiceUnavailable as err:
        raise ServiceUnavailable(
            f"job {job_id} was saved but could not be queued: {err.detail}. It stays queued; repeat the "
            "request with the same Idempotency-Key to queue it again, or cancel it.",
            headers=err.headers, job_id=job_id) from err


def get_job(*, session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job (another tenant's job is not found)."""
    return repo.get_job(session, job_id=job_id, tenant=tenant)


def job_public(*, session: Session, job: Job) -> JobPublic:
    return JobPublic.from_record(job, repo.list_attempts(session, job_id=job.id))


def list_jobs(*, session: Session, tenant: str, limit: int, after: str | None,
              status: JobStatus | None) -> JobsPublic:
    jobs, has_more = repo.list_jobs(session, tenant=tenant, limit=limit, after=after,
                                    status=status.value if status else None)
    return JobsPublic(data=[job_public(session=session, job=j) for j in jobs], has_more=has_more,
                      next_after=jobs[-1].id if has_more and jobs else None)


def cancel_job(*, session: Session, tenant: str, job_id: str) -> Job:
    """Queued jobs end at once; running ones become ``cancelling`` until their worker stops."""
    job = repo.request_cancel(session, job_id=job_id, tenant=tenant)
    session.commit()
    return job


def metric_keys(*, session: Session, tenant: str, job_id: str) -> MetricKeys:
    """Every key the job reported (``latest_metrics`` accumulates all of them)."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    return MetricKeys(keys=sorted(k for k in (job.latest_metrics or {}) if k != "step"))


def metric_history(*, session: Session, tenant: str, job_id: str, key: str, max_points: int) -> MetricHistory:
    get_job(session=session, tenant=tenant, job_id=job_id)
    rows = repo.metric_history(session, job_id=job_id, key=key, max_points=max_points)
    return MetricHistory(key=key, points=[MetricPointPublic(key=r.key, value=r.value, step=r.step,
                                                            timestamp=r.timestamp) for r in rows])


def count_by_status(session: Session) -> dict[str, int]:
    """Jobs of all tenants by status (for the Prometheus gauge). Belongs in ``jobstore.repo``."""
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {str(status): int(count) for status, count in rows}
