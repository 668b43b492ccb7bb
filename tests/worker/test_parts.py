"""Smaller pieces: run outputs on local and remote stores, error mapping, encoder cache, decoding."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from pydantic import ValidationError

from jobstore import repo
from jobstore.db import make_engine, migrate, session_factory
from jobstore.states import ErrorCode, JobStatus
from simmim.checkpoint import CheckpointManager
from simmim.errors import ConfigError, DataError, NonFiniteLossError
from simmim_service.artifacts import ArtifactStore
from simmim_service.spec import TrainingSpec
from tests.api.store import seed_job
from worker.embedding import EncoderCache, decode_images
from worker.failures import classify
from worker.outputs import JobOutputs, sweep_finished_scratch


def test_local_store_runs_in_place_and_keys_are_relative(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "root"))
    outputs = JobOutputs(store, "job_1", tmp_path / "work")
    assert outputs.directory == (tmp_path / "root" / "jobs" / "job_1").resolve()
    ckpt = CheckpointManager(outputs.directory / "checkpoints").save({"w": torch.ones(2)}, 4)
    assert outputs.publish_checkpoint(ckpt.path) == "jobs/job_1/checkpoints/ckpt_00000004.pt"
    assert outputs.restore_checkpoint("jobs/job_1/checkpoints/ckpt_00000004.pt")
    assert outputs.path("jobs/job_1/encoder/config.json") == outputs.directory / "encoder" / "config.json"
    with pytest.raises(ValueError, match="not under"):
        outputs.path("jobs/job_2/x")


def test_remote_store_gets_uploads_and_a_new_machine_restores_the_checkpoint(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://bucket-{uuid.uuid4().hex[:8]}")
    first = JobOutputs(store, "job_1", tmp_path / "machine_a")
    assert first.directory == (tmp_path / "machine_a" / "jobs" / "job_1").resolve()
    info = CheckpointManager(first.directory / "checkpoints").save({"w": torch.arange(5.0)}, 8)
    key = first.publish_checkpoint(info.path)
    assert store.exists(key) and store.exists(key.replace(".pt", ".json")) and store.size(key) == info.size

    second = JobOutputs(store, "job_1", tmp_path / "machine_b")
    assert second.restore_checkpoint(key)
    restored = CheckpointManager(second.directory / "checkpoints")
    latest = restored.latest_valid()
    assert latest is not None and latest.step == 8 and latest.sha256 == info.sha256
    assert torch.equal(restored.load(latest)["w"], torch.arange(5.0))
    assert not second.restore_checkpoint("jobs/job_1/checkpoints/ckpt_00000099.pt")


def test_the_sweep_deletes_scratch_copies_of_finished_jobs_only(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    migrate(engine)
    sessions = session_factory(engine)
    jobs = {status: seed_job(sessions, status=status) for status in (
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.RUNNING, JobStatus.RECOVERING)}
    work = tmp_path / "work"
    for job_id in jobs.values():
        (work / "jobs" / job_id / "checkpoints").mkdir(parents=True)
    (work / "jobs" / "job_neverheardof").mkdir()  # not in this store: not ours to judge
    (work / "jobs" / "notes").mkdir()  # not a job folder at all
    (work / "datasets").mkdir()  # fetched datasets are a cache, outside jobs/

    def finished(ids: list[str]) -> set[str]:
        with sessions() as s:
            return repo.finished_job_ids(s, job_ids=ids)

    swept = sweep_finished_scratch(work, finished)
    assert sorted(swept) == sorted(jobs[s] for s in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED))
    left = sorted(p.name for p in (work / "jobs").iterdir())
    assert left == sorted([jobs[JobStatus.RUNNING], jobs[JobStatus.RECOVERING], "job_neverheardof", "notes"])
    assert (work / "datasets").is_dir()
    assert sweep_finished_scratch(work, finished) == []
    assert sweep_finished_scratch(tmp_path / "no-work-dir-yet", finished) == []
    engine.dispose()


def _validation_error() -> ValidationError:
    try:
        TrainingSpec.model_validate({"batch_size": 0})
    except ValidationError as err:
        return err
    raise AssertionError("expected a validation error")


@pytest.mark.parametrize(("exc", "code", "words"), [
    (ConfigError(["model.mask_patch_size: must divide image_size"]), ErrorCode.INVALID_SPEC, "mask_patch_size"),
    (_validation_error(), ErrorCode.INVALID_SPEC, "batch_size"),
    (DataError("/data has no images"), ErrorCode.DATA_ERROR, "/data has no images"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ErrorCode.OOM, "lower training.batch_size"),
    (MemoryError(), ErrorCode.OOM, "accumulation_steps"),
    (NonFiniteLossError(7, float("nan")), ErrorCode.INTERNAL, "loss became nan at step 7"),
    (SoftTimeLimitExceeded(), ErrorCode.TIMEOUT, "time limit"),
    (RuntimeError("boom\n  File x.py, line 3"), ErrorCode.INTERNAL, "internal error (RuntimeError: boom)"),
])
def test_failures_map_to_codes_and_actionable_messages(exc: BaseException, code: ErrorCode, words: str) -> None:
    got_code, message = classify(exc)
    assert got_code == code and words in message
    assert "line 3" not in message and "Traceback" not in message


def test_encoder_cache_keeps_the_most_recently_used() -> None:
    loads: list[str] = []
    cache = EncoderCache(size=2)

    def get(name: str) -> Any:
        def load() -> Any:
            loads.append(name)
            return name

        return cache.get(("job", name), load)

    get("a"), get("b"), get("a"), get("c"), get("a"), get("b")
    assert loads == ["a", "b", "c", "b"]  # b was evicted by c, a stayed hot
    assert cache.keys() == [("job", "a"), ("job", "b")]


def _png_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_images_accepts_data_urls_and_refuses_bombs() -> None:
    (img,) = decode_images(["data:image/png;base64," + _png_b64((5, 4))], max_pixels=100)
    assert img.size == (5, 4) and img.mode == "RGB"
    with pytest.raises(ValueError, match=r"images\[1\]: too many pixels"):
        decode_images([_png_b64((5, 4)), _png_b64((20, 20))], max_pixels=100)
    with pytest.raises(ValueError, match=r"images\[0\]: expected a base64 string"):
        decode_images([123], max_pixels=100)  # type: ignore[list-item]
