"""``simmim.pretrain`` end to end: a real Celery worker process, Redis, SQLite and a tiny ViT."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from api.services.previews import list_previews
from jobstore import repo
from jobstore.states import JobStatus
from simmim.atomic import sha256_file
from simmim_service.artifacts import ArtifactStore
from tests.worker.stack import Stack
from worker.claim import parse_identity


def _statuses(stack: Stack, job_id: str) -> list[str]:
    events = stack.read(lambda s: repo.list_events(s, job_id=job_id))
    return [e.data["status"] for e in events if e.type == "status"]


def _logs(stack: Stack, job_id: str) -> list[str]:
    events = stack.read(lambda s: repo.list_events(s, job_id=job_id))
    return [e.data["message"] for e in events if e.type == "log"]


def test_job_runs_to_success_and_records_everything(worker: Stack, digits: dict[str, Path]) -> None:
    job_id = worker.create_job(digits["train"])
    assert worker.submit(job_id).get(timeout=120) == "succeeded"

    job = worker.job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.error_code is None
    assert job.progress["step"] == job.progress["total_steps"] == 10
    assert set(job.progress) == {"step", "total_steps", "epoch", "loss", "lr", "images_per_sec",
                                 "data_wait_fraction", "eta_seconds", "skipped_images"}
    assert _statuses(worker, job_id) == ["queued", "validating", "running", "succeeded"]
    assert _logs(worker, job_id)[0] == "attempt started" and _logs(worker, job_id)[-1].startswith("finished 10 steps")

    records = worker.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    ckpts = [c for c in records if c.kind == "checkpoint"]
    assert [(c.step, c.final) for c in ckpts] == [(4, False), (8, False), (10, True)]
    for record in records:
        assert not record.uri.startswith("/") and record.uri.startswith(f"jobs/{job_id}/")
        path = worker.artifacts / record.uri
        assert sha256_file(path) == record.sha256 and path.stat().st_size == record.size
    (encoder,) = [c for c in records if c.kind == "encoder"]
    assert encoder.uri == f"jobs/{job_id}/encoder/encoder.safetensors" and encoder.step == 10 and encoder.final
    assert (worker.artifacts / f"jobs/{job_id}/encoder/config.json").is_file()

    losses = worker.read(lambda s: repo.metric_history(s, job_id=job_id, key="loss"))
    assert [p.step for p in losses][-1] == 10 and len(losses) >= 2
    assert job.latest_metrics["step"] == 10 and {"loss", "lr", "images_per_sec"} <= set(job.latest_metrics)

    # a reconstruction preview per checkpoint, listed as the API lists them; TensorBoard events
    store = ArtifactStore(str(worker.artifacts))
    previews = worker.read(lambda s: list_previews(session=s, artifacts=store, tenant="t", job_id=job_id))
    assert [(p.step, p.width, p.height) for p in previews.data] == [(s, 138, 274) for s in (4, 8, 10)]
    assert list((worker.artifacts / f"jobs/{job_id}/tensorboard").glob("events.out.tfevents.*"))


def test_pruned_checkpoints_leave_the_listing(worker: Stack, digits: dict[str, Path]) -> None:
    job_id = worker.create_job(digits["train"], max_steps=10, checkpoint_every=2, keep_last=1)
    assert worker.submit(job_id).get(timeout=120) == "succeeded"
    records = worker.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    ckpts = [c for c in records if c.kind == "checkpoint"]
    assert [(c.step, c.final) for c in ckpts] == [(8, False), (10, True)]  # keep_last=1 plus the final
    assert all((worker.artifacts / c.uri).is_file() for c in records)


def test_redelivery_of_a_finished_job_does_nothing(worker: Stack, digits: dict[str, Path]) -> None:
    job_id = worker.create_job(digits["train"], max_steps=2, checkpoint_every=2)
    assert worker.submit(job_id).get(timeout=120) == "succeeded"
    before = worker.job(job_id)
    events = len(worker.read(lambda s: repo.list_events(s, job_id=job_id)))

    assert worker.submit(job_id).get(timeout=60) == "skipped"
    after = worker.job(job_id)
    assert after.attempt == before.attempt == 1 and after.status == JobStatus.SUCCEEDED
    assert len(worker.read(lambda s: repo.list_events(s, job_id=job_id))) == events


def test_cancel_stops_training_within_seconds_and_frees_the_worker(worker: Stack,
                                                                    digits: dict[str, Path]) -> None:
    # One DataLoader worker: a pool process must be allowed to start (and stop) loader processes.
    job_id = worker.create_job(digits["train"], max_steps=500, checkpoint_every=1000, num_workers=1)
    result = worker.submit(job_id)
    worker.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 2)
    with worker.sessions.begin() as s:
        repo.request_cancel(s, job_id=job_id)
    asked = time.monotonic()

    job = worker.wait_for(job_id, lambda j: j.status == JobStatus.CANCELLED, timeout=10)
    assert time.monotonic() - asked < 10
    assert result.get(timeout=10) == "cancelled"
    assert job.progress["step"] < 500
    (stop_ckpt,) = worker.read(lambda s: repo.list_checkpoints(s, job_id=job_id))
    assert stop_ckpt.kind == "checkpoint" and not stop_ckpt.final and stop_ckpt.step >= 2
    assert _statuses(worker, job_id)[-2:] == ["cancelling", "cancelled"]
    # The same (single) pool process takes the next job right away.
    next_job = worker.create_job(digits["train"], max_steps=1, checkpoint_every=1)
    assert worker.submit(next_job).get(timeout=60) == "succeeded"


def test_unusable_datasets_and_specs_fail_with_a_code_and_message(worker: Stack, digits: dict[str, Path],
                                                                  corrupt_dataset: Path, tmp_path: Path) -> None:
    cases = {
        "corrupt": (worker.create_job(corrupt_dataset), "data_error", "could be decoded"),
        "missing": (worker.create_job(tmp_path / "nowhere"), "data_error", "does not exist"),
        "geometry": (worker.create_job(digits["train"], mask_patch_size=7), "invalid_spec", "mask_patch_size"),
        "too_big": (worker.create_job(digits["train"], batch_size=4096), "data_error", "lower training.batch_size"),
    }
    for name, (job_id, code, words) in cases.items():
        assert worker.submit(job_id).get(timeout=60) == "failed", name
        job = worker.job(job_id)
        assert (job.status, job.error_code) == (JobStatus.FAILED, code), (name, job.error_message)
        assert words in (job.error_message or ""), (name, job.error_message)
        assert "Traceback" not in (job.error_message or "")
        assert _statuses(worker, job_id) == ["queued", "validating", "failed"], name


def test_killed_pool_process_is_replaced_and_the_job_resumes(worker: Stack, digits: dict[str, Path]) -> None:
    job_id = worker.create_job(digits["train"], max_steps=16, checkpoint_every=4)
    result = worker.submit(job_id)
    job = worker.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 5)
    _, pid = parse_identity(job.worker or "")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # like the kernel's OOM killer

    job = worker.wait_for(job_id, lambda j: j.status == JobStatus.SUCCEEDED, timeout=120)
    assert job.attempt == 2 and job.progress["step"] == 16
    attempts = worker.read(lambda s: repo.list_attempts(s, job_id=job_id))
    assert [a.reason for a in attempts] == ["worker_lost", "succeeded"]
    resumed = [m for m in _logs(worker, job_id) if m.startswith("resuming from the checkpoint at step")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 4
    assert result.get(timeout=10) == "succeeded"
