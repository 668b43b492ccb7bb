"""``training.gpus: 2`` through the real worker path: Celery task, lease, launcher, 2 gloo ranks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobstore import repo
from jobstore.states import JobStatus
from tests.services import alive
from tests.worker.stack import Stack, celery_worker


@pytest.fixture(scope="module")
def pair(stack: Stack) -> Iterator[Stack]:
    """A worker that owns two devices (CPU processes here) and so consumes train and train.gpus2."""
    stack.settings = stack.settings.model_copy(update={"worker_gpus": 2})
    with celery_worker(stack, "pair", queues="train,train.gpus2"):
        yield stack


def _rank_pids(stack: Stack, job_id: str) -> list[int]:
    events = stack.read(lambda s: repo.list_events(s, job_id=job_id))
    started = [e.data for e in events if e.type == "log" and "data-parallel" in e.data["message"]]
    assert started, [e.data for e in events]
    return list(started[-1]["pids"])


def test_two_gpu_job_runs_to_success_as_two_processes(pair: Stack, digits: dict[str, Path]) -> None:
    job_id = pair.create_job(digits["train"], gpus=2, batch_size=8, max_steps=6, checkpoint_every=3)
    assert pair.submit(job_id, gpus=2).get(timeout=180) == "succeeded"

    job = pair.job(job_id)
    assert job.status == JobStatus.SUCCEEDED
    assert job.progress["step"] == job.progress["total_steps"] == 6
    pids = _rank_pids(pair, job_id)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    records = pair.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    assert sorted((r.kind, r.step) for r in records) == [("checkpoint", 3), ("checkpoint", 6), ("encoder", 6)]
    for record in records:  # recorded files exist where the key says, under this job only
        assert (pair.artifacts / record.uri).is_file() and record.uri.startswith(f"jobs/{job_id}/")
    metrics = pair.read(lambda s: repo.metric_history(s, job_id=job_id, key="loss"))
    assert [m.step for m in metrics][-1] == 6


def test_cancel_stops_both_processes(pair: Stack, digits: dict[str, Path], record_property: Any) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)  # a cancel of a running 2-process job
    record_property("jobs", 1)
    job_id = pair.create_job(digits["train"], gpus=2, batch_size=8, max_steps=100000, checkpoint_every=100000)
    result = pair.submit(job_id, gpus=2)
    pair.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 2, timeout=120)
    pids = _rank_pids(pair, job_id)
    assert all(alive(pid) for pid in pids)
    with pair.sessions.begin() as s:
        repo.request_cancel(s, job_id=job_id)

    job = pair.wait_for(job_id, lambda j: j.status == JobStatus.CANCELLED, timeout=30)
    assert result.get(timeout=30) == "cancelled"
    assert not any(alive(pid) for pid in pids)
    (stop,) = pair.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    assert stop.step == job.progress["step"] >= 2 and not stop.final


def test_a_two_gpu_job_never_reaches_a_one_gpu_worker(stack: Stack, digits: dict[str, Path]) -> None:
    """Routing: only the queues a worker can serve are consumed."""
    from worker.cli import worker_commands

    (one,) = worker_commands(["train"], [0], 1, "info", stack.settings.model_copy(update={"worker_gpus": 1}))
    (two,) = worker_commands(["train", "embed"], [0, 1], 1, "info", stack.settings, gpus_per_worker=2)
    assert one.argv[one.argv.index("-Q") + 1] == "train"
    assert two.argv[two.argv.index("-Q") + 1] == "train,train.gpus2,embed"
    assert two.env["SIMMIM_WORKER_GPUS"] == "2" and two.env["CUDA_VISIBLE_DEVICES"] == "0,1"
