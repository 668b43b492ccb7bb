from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repo
from jobstore.db import make_engine, migrate
from jobstore.states import JobStatus

SPEC = {"dataset": "/data/x", "training": {"model": "vit_tiny_patch16_224"}}


def _job(sessions: sessionmaker[Session], tenant: str = "t1", **kw) -> str:
    with sessions.begin() as s:
        job, created = repo.create_job(s, tenant=tenant, spec=SPEC, **kw)
        assert created
        return job.id


def test_migrations_create_every_table_and_are_idempotent(store_url: str) -> None:
    engine = make_engine(store_url)
    migrate(engine)
    migrate(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"jobs", "job_attempts", "job_events", "job_metrics", "job_checkpoints", "alembic_version"} <= tables
    engine.dispose()


def test_create_get_and_tenant_isolation(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions, name="first", metadata={"team": "vision"})
    with sessions() as s:
        job = repo.get_job(s, job_id=job_id, tenant="t1")
        assert job.status == JobStatus.QUEUED and job.meta == {"team": "vision"}
        assert job.created_at.tzinfo is not None
        with pytest.raises(repo.JobNotFoundError):
            repo.get_job(s, job_id=job_id, tenant="t2")


def test_idempotency_key_replays_and_conflicts(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        a, created_a = repo.create_job(s, tenant="t1", spec=SPEC, idempotency_key="k", request_hash="h1")
    with sessions.begin() as s:
        b, created_b = repo.create_job(s, tenant="t1", spec=SPEC, idempotency_key="k", request_hash="h1")
        assert (b.id, created_a, created_b) == (a.id, True, False)
        with pytest.raises(repo.IdempotencyConflictError):
            repo.create_job(s, tenant="t1", spec=SPEC, idempotency_key="k", request_hash="other")
    with sessions.begin() as s:  # the same key in another tenant is a different job
        c, created_c = repo.create_job(s, tenant="t2", spec=SPEC, idempotency_key="k", request_hash="h1")
        assert created_c and c.id != a.id


def test_cursor_pagination_newest_first(sessions: sessionmaker[Session]) -> None:
    ids = [_job(sessions) for _ in range(5)]
    _job(sessions, tenant="other")
    seen, after = [], None
    with sessions() as s:
        while True:
            page, has_more = repo.list_jobs(s, tenant="t1", limit=2, after=after)
            seen += [j.id for j in page]
            if not has_more:
                break
            after = page[-1].id
    assert seen == sorted(ids, reverse=True)


def test_attempt_fencing_stops_a_stale_worker(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions.begin() as s:
        first = repo.start_attempt(s, job_id=job_id, worker="w1")
    with sessions.begin() as s:
        repo.set_status(s, job_id=job_id, attempt=first, status=JobStatus.RUNNING)
    with sessions.begin() as s:  # re-delivered while attempt 1 still heart-beats: not taken
        assert repo.start_attempt(s, job_id=job_id, worker="w2") is None
    with sessions.begin() as s:  # lease expired: attempt 2 takes over
        second = repo.start_attempt(s, job_id=job_id, worker="w2", lease_seconds=0)
    assert (first, second) == (1, 2)
    with sessions.begin() as s, pytest.raises(repo.StaleAttemptError):
        repo.record_progress(s, job_id=job_id, attempt=first, progress={"step": 5})
    with sessions.begin() as s, pytest.raises(repo.StaleAttemptError):
        repo.add_checkpoint(s, job_id=job_id, attempt=first, step=5, uri="x", sha256="0" * 64, size=1)
    with sessions.begin() as s:
        repo.set_status(s, job_id=job_id, attempt=second, status=JobStatus.RUNNING)
        repo.set_status(s, job_id=job_id, attempt=second, status=JobStatus.SUCCEEDED)
    with sessions() as s:
        attempts = repo.list_attempts(s, job_id=job_id)
        assert [(a.number, a.worker, a.reason) for a in attempts] == [(1, "w1", "worker_lost"), (2, "w2", "succeeded")]


def test_cancel_paths(sessions: sessionmaker[Session]) -> None:
    queued = _job(sessions)
    with sessions.begin() as s:
        assert repo.request_cancel(s, job_id=queued, tenant="t1").status == JobStatus.CANCELLED
    running = _job(sessions)
    with sessions.begin() as s:
        attempt = repo.start_attempt(s, job_id=running, worker="w")
        repo.set_status(s, job_id=running, attempt=attempt, status=JobStatus.RUNNING)
    with sessions.begin() as s:
        assert repo.request_cancel(s, job_id=running).status == JobStatus.CANCELLING
    with sessions.begin() as s:
        assert repo.record_progress(s, job_id=running, attempt=attempt, progress={"step": 1}) is True
        repo.set_status(s, job_id=running, attempt=attempt, status=JobStatus.CANCELLED)
    with sessions.begin() as s, pytest.raises(repo.InvalidTransitionError):
        repo.request_cancel(s, job_id=running)
    with sessions.begin() as s:  # a cancelled job is never started again
        assert repo.start_attempt(s, job_id=queued, worker="w") is None


def test_progress_metrics_history_and_events(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions.begin() as s:
        attempt = repo.start_attempt(s, job_id=job_id, worker="w")
        repo.set_status(s, job_id=job_id, attempt=attempt, status=JobStatus.RUNNING)
    for step in range(1, 101):
        with sessions.begin() as s:
            repo.record_progress(s, job_id=job_id, attempt=attempt, progress={"step": step, "total": 100},
                                 metrics={"loss": 1.0 / step, "lr": 0.1})
    with sessions() as s:
        history = repo.metric_history(s, job_id=job_id, key="loss", max_points=10)
        assert len(history) == 10 and history[0].step == 1 and history[-1].step == 100
        assert [p.step for p in history] == sorted(p.step for p in history)
        job = repo.get_job(s, job_id=job_id)
        assert job.latest_metrics["loss"] == pytest.approx(0.01) and job.progress["step"] == 100
        events = repo.list_events(s, job_id=job_id)
        assert [e.data["status"] for e in events if e.type == "status"] == ["queued", "validating", "running"]
        later = repo.list_events(s, job_id=job_id, after_id=events[-5].id)
        assert [e.id for e in later] == [e.id for e in events[-4:]]


def test_expired_heartbeat_marks_job_recovering(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions.begin() as s:
        attempt = repo.start_attempt(s, job_id=job_id, worker="w")
        repo.set_status(s, job_id=job_id, attempt=attempt, status=JobStatus.RUNNING)
    with sessions.begin() as s:
        assert repo.expire_stale_attempts(s, older_than=datetime.now(UTC) - timedelta(minutes=5)) == []
    with sessions.begin() as s:
        assert repo.expire_stale_attempts(s, older_than=datetime.now(UTC) + timedelta(seconds=1)) == [job_id]
    with sessions() as s:
        assert repo.get_job(s, job_id=job_id).status == JobStatus.RECOVERING
        assert repo.list_attempts(s, job_id=job_id)[0].reason == "worker_lost"


def test_a_job_that_keeps_losing_its_worker_fails_after_max_lost(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    later = datetime.now(UTC) + timedelta(seconds=1)
    for lost in (1, 2):
        with sessions.begin() as s:
            attempt = repo.start_attempt(s, job_id=job_id, worker=f"w{lost}")
            repo.set_status(s, job_id=job_id, attempt=attempt, status=JobStatus.RUNNING)
        with sessions.begin() as s:
            expired = repo.expire_stale_attempts(s, older_than=later, max_lost=2)
        with sessions() as s:
            job = repo.get_job(s, job_id=job_id)
            assert repo.count_lost_attempts(s, job_id=job_id) == lost
        if lost == 1:
            assert expired == [job_id] and job.status == JobStatus.RECOVERING
    assert expired == [] and job.status == JobStatus.FAILED and job.error_code == "worker_lost"
    assert "lost its worker 2 times" in (job.error_message or "")


def test_waiting_jobs_are_redispatched_once_per_period(sessions: sessionmaker[Session]) -> None:
    old, fresh = _job(sessions), _job(sessions)
    running = _job(sessions)
    with sessions.begin() as s:
        repo.mark_dispatched(s, job_id=fresh)
        repo.start_attempt(s, job_id=running, worker="w")
    now = datetime.now(UTC)
    with sessions.begin() as s:  # everything was sent (or created) after this instant: nothing to do
        assert repo.jobs_to_redispatch(s, older_than=now - timedelta(minutes=5)) == []
    with sessions.begin() as s:
        due = {j.id for j in repo.jobs_to_redispatch(s, older_than=now + timedelta(seconds=1))}
    assert due == {old, fresh}  # never sent, and sent too long ago; not the running one
    with sessions.begin() as s:  # just bumped (after `now`): not due again until a period has passed
        assert repo.jobs_to_redispatch(s, older_than=now) == []


def test_overrides_are_fenced(sessions: sessionmaker[Session]) -> None:
    job_id = _job(sessions)
    with sessions.begin() as s:
        first = repo.start_attempt(s, job_id=job_id, worker="w1")
        repo.set_overrides(s, job_id=job_id, attempt=first, overrides={"batch_size": 8})
    with sessions.begin() as s:
        repo.start_attempt(s, job_id=job_id, worker="w2", lease_seconds=0)
    with pytest.raises(repo.StaleAttemptError), sessions.begin() as s:
        repo.set_overrides(s, job_id=job_id, attempt=first, overrides={"batch_size": 4})
    with sessions() as s:
        assert repo.get_job(s, job_id=job_id).overrides == {"batch_size": 8}
