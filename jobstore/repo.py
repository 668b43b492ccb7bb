"""Every read and write of job records. Callers own the transaction (``with factory.begin()``).

Writes from workers are fenced by the attempt number: a worker of an older attempt that
wakes up gets ``StaleAttemptError`` and must stop, so two attempts never write at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from jobstore.ids import new_id
from jobstore.models import (
    Attempt,
    Checkpoint,
    EmbeddingRun,
    Job,
    JobEvent,
    MetricPoint,
    WebhookDelivery,
)
from jobstore.states import TERMINAL, JobStatus, can_transition


class StoreError(Exception):
    """Base class of job-store errors."""


class JobNotFoundError(StoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class StaleAttemptError(StoreError):
    """A worker of an older attempt tried to write; it must stop at once."""


class InvalidTransitionError(StoreError):
    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"job {job_id} is {current}; it cannot become {target}")
        self.current, self.target = current, target


class IdempotencyConflictError(StoreError):
    """The idempotency key was used before with a different request body."""


def _now() -> datetime:
    return datetime.now(UTC)


def create_job(session: Session, *, tenant: str, spec: dict[str, Any], name: str | None = None,
               metadata: dict[str, Any] | None = None, idempotency_key: str | None = None,
               request_hash: str | None = None, webhook: dict[str, Any] | None = None) -> tuple[Job, bool]:
    """Insert a queued job; with a known idempotency key return the earlier job instead.

    Returns (job, created).
    """
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if request_hash is not None and existing.request_hash != request_hash:
                raise IdempotencyConflictError(
                    f"Idempotency-Key {idempotency_key!r} was already used with a different request body")
            return existing, False
    job = Job(id=new_id("job"), tenant=tenant, name=name, status=JobStatus.QUEUED, spec=spec,
              meta=metadata or {}, idempotency_key=idempotency_key, request_hash=request_hash,
              attempt=0, cancel_requested=False, progress={}, latest_metrics={}, webhook=webhook or None)
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, type="status", data={"status": job.status, "attempt": 0})
    return job, True


def get_job(session: Session, *, job_id: str, tenant: str | None = None, lock: bool = False) -> Job:
    """The job, only if it belongs to ``tenant`` (None: any tenant, for workers)."""
    query = select(Job).where(Job.id == job_id)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if lock:
        query = query.with_for_update()
    job = session.scalar(query)
    if job is None:
        raise JobNotFoundError(job_id)
    return job


def finished_job_ids(session: Session, *, job_ids: list[str]) -> set[str]:
    """Those of ``job_ids`` whose job has ended (succeeded, failed or cancelled), any tenant."""
    if not job_ids:
        return set()
    query = select(Job.id).where(Job.id.in_(job_ids), Job.status.in_([s.value for s in TERMINAL]))
    return set(session.scalars(query))


def list_jobs(session: Session, *, tenant: str, limit: int = 20, after: str | None = None,
              status: str | None = None) -> tuple[list[Job], bool]:
    """Newest first; ``after`` is the id of the last job of the previous page. Returns (jobs, has_more)."""
    query = select(Job).where(Job.tenant == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        query = query.where(Job.id < after)
    rows = list(session.scalars(query.order_by(Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _set_status(session: Session, job: Job, target: JobStatus, **fields: Any) -> None:
    current = JobStatus(job.status)
    if current == target:
        return
    if not can_transition(current, target):
        raise InvalidTransitionError(job.id, current, target)
    job.status = target
    for key, value in fields.items():
        setattr(job, key, value)
    if target in TERMINAL:
        job.finished_at = _now()
    session.flush()
    data: dict[str, Any] = {"status": target, "attempt": job.attempt}
    if job.error_code:
        data["error"] = {"code": job.error_code, "message": job.error_message}
    add_event(session, job_id=job.id, type="status", data=data)
    if target in TERMINAL and job.webhook:
        _queue_webhook(session, job)


def _queue_webhook(session: Session, job: Job) -> WebhookDelivery:
    """Outbox row for the job's terminal event, in the caller's transaction (sent by the API)."""
    delivery_id = new_id("whd")
    now = _now()
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    payload = {
        "id": delivery_id, "type": f"job.{job.status}", "created_at": now.isoformat(),
        "data": {"job_id": job.id, "name": job.name, "status": str(job.status), "error": error,
                 "progress": job.progress or {}, "latest_metrics": job.latest_metrics or {},
                 "attempt": job.attempt, "metadata": job.meta or {},
                 "finished_at": job.finished_at.isoformat() if job.finished_at else None},
    }
    row = WebhookDelivery(id=delivery_id, job_id=job.id, event=payload["type"], payload=payload,
                          status="pending", attempts=0, next_attempt_at=now, created_at=now)
    session.add(row)
    return row


def claim_webhook_deliveries(session: Session, *, now: datetime, lease: timedelta,
                             limit: int = 20) -> list[tuple[WebhookDelivery, dict[str, Any]]]:
    """Due pending deliveries with their job's webhook (``{url, secret}``), claimed for ``lease``.

    Claiming pushes ``next_attempt_at`` past the send, so another API process (or this one
    after a crash) only retries a delivery whose sender vanished. Rows another process holds
    are skipped (PostgreSQL ``FOR UPDATE SKIP LOCKED``).
    """
    rows = list(session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit).with_for_update(skip_locked=True)))
    claimed = []
    for row in rows:
        job = session.get(Job, row.job_id)
        if job is None or not job.webhook:
            row.status, row.next_attempt_at, row.last_error = "failed", None, "the job has no webhook"
            continue
        row.next_attempt_at = now + lease
        claimed.append((row, dict(job.webhook)))
    return claimed


def record_webhook_attempt(session: Session, *, delivery_id: str, error: str | None,
                           retry_at: datetime | None) -> WebhookDelivery:
    """Count one try: delivered (``error`` None), due again at ``retry_at``, or given up (both None)."""
    row = session.get(WebhookDelivery, delivery_id)
    if row is None:
        raise StoreError(f"webhook delivery {delivery_id!r} not found")
    row.attempts += 1
    row.last_error = error
    if error is None:
        row.status, row.delivered_at, row.next_attempt_at = "delivered", _now(), None
    elif retry_at is not None:
        row.next_attempt_at = retry_at
    else:
        row.status, row.next_attempt_at = "failed", None
    return row


def list_webhook_deliveries(session: Session, *, job_id: str) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))


def request_cancel(session: Session, *, job_id: str, tenant: str | None = None) -> Job:
    """Ask a job to stop: queued jobs end now, running ones go ``cancelling`` until the worker stops."""
    job = get_job(session, job_id=job_id, tenant=tenant, lock=True)
    status = JobStatus(job.status)
    if status in TERMINAL:
        raise InvalidTransitionError(job.id, status, JobStatus.CANCELLED)
    job.cancel_requested = True
    if status in (JobStatus.QUEUED, JobStatus.RECOVERING):
        _set_status(session, job, JobStatus.CANCELLED)
    elif status != JobStatus.CANCELLING:
        _set_status(session, job, JobStatus.CANCELLING)
    return job


def start_attempt(session: Session, *, job_id: str, worker: str, lease_seconds: float = 120.0) -> int | None:
    """Claim the job for a new attempt (``validating``); None when there is nothing to run.

    A job whose current attempt still heart-beats within ``lease_seconds`` is left alone (a
    re-delivered task must not train it twice); an expired one goes through ``recovering``.
    The attempt number goes up by one, which fences out any earlier attempt.
    """
    job = get_job(session, job_id=job_id, lock=True)
    status = JobStatus(job.status)
    if status in TERMINAL:
        return None
    if job.cancel_requested:
        _end_attempt(session, job, reason="cancelled")
        _set_status(session, job, JobStatus.CANCELLED)
        return None
    if status in (JobStatus.VALIDATING, JobStatus.RUNNING, JobStatus.CANCELLING):
        fresh = job.heartbeat_at is not None and _now() - job.heartbeat_at < timedelta(seconds=lease_seconds)
        if fresh:
            return None
        _end_attempt(session, job, reason="worker_lost")
        _set_status(session, job, JobStatus.RECOVERING)
    elif job.attempt > 0:
        _end_attempt(session, job, reason="worker_lost")
    job.attempt += 1
    job.worker = worker
    job.heartbeat_at = _now()
    job.started_at = job.started_at or _now()
    session.add(Attempt(job_id=job.id, number=job.attempt, worker=worker))
    _set_status(session, job, JobStatus.VALIDATING)
    return job.attempt


def _fenced(session: Session, job_id: str, attempt: int) -> Job:
    job = get_job(session, job_id=job_id, lock=True)
    if job.attempt != attempt:
        raise StaleAttemptError(f"job {job_id}: attempt {attempt} was superseded by attempt {job.attempt}")
    return job


def _end_attempt(session: Session, job: Job, reason: str) -> None:
    row = session.scalar(select(Attempt).where(Attempt.job_id == job.id, Attempt.number == job.attempt))
    if row is not None and row.ended_at is None:
        row.ended_at, row.reason = _now(), reason


def set_status(session: Session, *, job_id: str, attempt: int, status: JobStatus,
               error_code: str | None = None, error_message: str | None = None) -> Job:
    """Move a job on behalf of its current attempt (fenced)."""
    job = _fenced(session, job_id, attempt)
    fields: dict[str, Any] = {}
    if error_code is not None:
        fields = {"error_code": error_code, "error_message": error_message}
    _set_status(session, job, status, **fields)
    if status in TERMINAL:
        _end_attempt(session, job, reason=status if error_code is None else error_code)
    return job


def record_progress(session: Session, *, job_id: str, attempt: int, progress: dict[str, Any],
                    metrics: dict[str, float] | None = None, step: int | None = None) -> bool:
    """Store progress, append metric points and renew the heartbeat (fenced).

    Returns True when cancellation has been requested, so the worker can stop.
    """
    job = _fenced(session, job_id, attempt)
    job.progress = progress
    job.heartbeat_at = _now()
    if metrics:
        stamp = _now()
        at = step if step is not None else int(progress.get("step", 0))
        session.add_all(MetricPoint(job_id=job_id, key=k, value=float(v), step=at, timestamp=stamp)
                        for k, v in metrics.items())
        job.latest_metrics = {**job.latest_metrics, **{k: float(v) for k, v in metrics.items()}, "step": at}
        add_event(session, job_id=job_id, type="metrics", data={"step": at, **metrics})
    return job.cancel_requested


def heartbeat(session: Session, *, job_id: str, attempt: int) -> bool:
    """Renew the lease of the current attempt; returns whether cancellation was requested."""
    job = _fenced(session, job_id, attempt)
    job.heartbeat_at = _now()
    return job.cancel_requested


def add_checkpoint(session: Session, *, job_id: str, attempt: int, step: int, uri: str, sha256: str,
                   size: int, final: bool = False, kind: str = "checkpoint") -> Checkpoint:
    """Record a complete artifact (fenced): a checkpoint or the exported encoder."""
    _fenced(session, job_id, attempt)
    ckpt = Checkpoint(id=new_id("ckpt"), job_id=job_id, step=step, uri=uri, sha256=sha256, size=size,
                      final=final, kind=kind)
    session.add(ckpt)
    session.flush()
    add_event(session, job_id=job_id, type="checkpoint",
              data={"id": ckpt.id, "step": step, "kind": kind, "final": final})
    return ckpt


def list_checkpoints(session: Session, *, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                .order_by(Checkpoint.step, Checkpoint.id)))


def get_checkpoint(session: Session, *, job_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.id == checkpoint_id))


def list_attempts(session: Session, *, job_id: str) -> list[Attempt]:
    return list(session.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))


def add_event(session: Session, *, job_id: str, type: str, data: dict[str, Any]) -> JobEvent:
    """Append an event (``status``, ``metrics``, ``checkpoint`` or ``log``)."""
    event = JobEvent(job_id=job_id, type=type, data=data)
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, *, job_id: str, after_id: int = 0, limit: int = 500) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                                .order_by(JobEvent.id).limit(limit)))


def metric_history(session: Session, *, job_id: str, key: str, max_points: int = 500) -> list[MetricPoint]:
    """Points of one metric by step, evenly thinned to at most ``max_points`` (last point kept)."""
    total = session.scalar(select(func.count()).select_from(MetricPoint)
                           .where(MetricPoint.job_id == job_id, MetricPoint.key == key)) or 0
    rows = list(session.scalars(select(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.key == key)
                                .order_by(MetricPoint.step, MetricPoint.id)))
    if total <= max_points:
        return rows
    stride = total / max_points
    picked = [rows[int(i * stride)] for i in range(max_points - 1)]
    return [*picked, rows[-1]]


def expire_stale_attempts(session: Session, *, older_than: datetime, max_lost: int | None = None) -> list[str]:
    """Jobs whose attempt stopped heart-beating before ``older_than``.

    Each such attempt ends as ``worker_lost``. A job being cancelled becomes ``cancelled``;
    one that has now lost ``max_lost`` attempts ``failed`` (``worker_lost``); the others
    go ``recovering``, and their ids are returned so the caller re-queues them. Rows are
    locked and skipped when another reaper holds them (PostgreSQL), so reapers in several
    API processes never handle one job twice.
    """
    stale = list(session.scalars(
        select(Job).where(Job.status.in_([JobStatus.VALIDATING, JobStatus.RUNNING, JobStatus.CANCELLING]),
                          Job.heartbeat_at < older_than).with_for_update(skip_locked=True)))
    ids = []
    for job in stale:
        _end_attempt(session, job, reason="worker_lost")
        if job.status == JobStatus.CANCELLING:
            _set_status(session, job, JobStatus.CANCELLED)
            continue
        lost = count_lost_attempts(session, job_id=job.id)
        if max_lost is not None and lost >= max_lost:
            _set_status(session, job, JobStatus.FAILED, error_code="worker_lost",
                        error_message=f"the job lost its worker {lost} times (the machine or process died "
                                      "or stopped answering); giving up. Resubmit it to start over, or "
                                      "raise SIMMIM_MAX_LOST_ATTEMPTS")
            continue
        _set_status(session, job, JobStatus.RECOVERING)
        ids.append(job.id)
    return ids


def count_lost_attempts(session: Session, *, job_id: str) -> int:
    """How many attempts of the job ended because their worker was lost."""
    return len(list(session.scalars(select(Attempt.id).where(Attempt.job_id == job_id,
                                                             Attempt.reason == "worker_lost"))))


def mark_dispatched(session: Session, *, job_id: str) -> None:
    """Note that the job's task was just sent to the broker."""
    job = get_job(session, job_id=job_id)
    job.dispatched_at = _now()


def jobs_to_redispatch(session: Session, *, older_than: datetime, limit: int = 100) -> list[Job]:
    """Jobs waiting (``queued``/``recovering``) whose task was last sent before ``older_than``.

    Their message may have been lost (a broker restarted without persistence, a send that
    failed). Re-sending is safe: a duplicate delivery finds the job owned or finished and
    does nothing. ``dispatched_at`` is bumped here, so each is re-sent once per period.
    """
    waiting = list(session.scalars(
        select(Job).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RECOVERING]),
                          or_(Job.dispatched_at.is_(None), Job.dispatched_at < older_than),
                          Job.created_at < older_than)
        .order_by(Job.created_at).limit(limit).with_for_update(skip_locked=True)))
    for job in waiting:
        job.dispatched_at = _now()
    return waiting


def set_overrides(session: Session, *, job_id: str, attempt: int, overrides: dict[str, Any]) -> Job:
    """Record training settings the service changed for this job (fenced), e.g. after an OOM."""
    job = _fenced(session, job_id, attempt)
    job.overrides = {**(job.overrides or {}), **overrides}
    return job


def create_embedding_run(session: Session, *, job_id: str, dataset: str, options: dict[str, Any]) -> EmbeddingRun:
    """A queued embedding run of ``dataset`` with the encoder of ``job_id``."""
    run = EmbeddingRun(id=new_id("emb"), job_id=job_id, dataset=dataset, options=options,
                       status=JobStatus.QUEUED, progress={}, failed=[])
    session.add(run)
    session.flush()
    return run


def get_embedding_run(session: Session, *, job_id: str, run_id: str) -> EmbeddingRun | None:
    return session.scalar(select(EmbeddingRun).where(EmbeddingRun.job_id == job_id, EmbeddingRun.id == run_id))


def embedding_runs_of(session: Session, *, job_id: str, dataset: str) -> list[EmbeddingRun]:
    """The job's embedding runs of ``dataset``, newest first."""
    return list(session.scalars(select(EmbeddingRun).where(EmbeddingRun.job_id == job_id,
                                                           EmbeddingRun.dataset == dataset)
                                .order_by(EmbeddingRun.created_at.desc(), EmbeddingRun.id.desc())))


def update_embedding_run(session: Session, *, run_id: str, **fields: Any) -> EmbeddingRun:
    """Set fields of an embedding run (status, progress, keys, count, failed, error_message)."""
    run = session.get(EmbeddingRun, run_id)
    if run is None:
        raise StoreError(f"embedding run {run_id!r} not found")
    for key, value in fields.items():
        setattr(run, key, value)
    if fields.get("status") in TERMINAL:
        run.finished_at = _now()
    return run


def forget_checkpoints(session: Session, *, job_id: str, attempt: int, keep: set[tuple[str, str]]) -> int:
    """Delete checkpoint rows (not the encoder) whose (uri, sha256) is not in ``keep`` (fenced).

    Called after the trainer prunes old checkpoints, so listings never offer deleted files.
    Returns how many rows were removed.
    """
    _fenced(session, job_id, attempt)
    rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.kind == "checkpoint"))
    stale = [row for row in rows if (row.uri, row.sha256) not in keep]
    for row in stale:
        session.delete(row)
    return len(stale)
