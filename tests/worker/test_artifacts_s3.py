"""The artifact store and a job's outputs on an S3-compatible server (moto), as several hosts share it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from starlette.datastructures import Headers

from api.downloads import Download, serve
from api.errors import Gone
from simmim.checkpoint import CheckpointManager
from simmim_service.artifacts import ArtifactStore
from tests.s3 import S3, s3_server
from worker.outputs import JobOutputs


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3) -> str:
    return s3.new_bucket()


def _store(s3: S3, bucket: str, prefix: str = "svc") -> ArtifactStore:
    return ArtifactStore(f"s3://{bucket}/{prefix}", s3.storage_options)


def test_keys_round_trip_and_list_relative_to_the_root(s3: S3, bucket: str, tmp_path: Path) -> None:
    store = _store(s3, bucket)
    data = bytes(range(256)) * 50
    (tmp_path / "f.bin").write_bytes(data)
    store.put_file(tmp_path / "f.bin", "jobs/a/checkpoints/ckpt_00000002.pt")
    store.put_file(tmp_path / "f.bin", "jobs/a/encoder/config.json")
    store.put_file(tmp_path / "f.bin", "jobs/ab/x.txt")  # a sibling whose name shares the prefix

    assert s3.keys(bucket) == ["svc/jobs/a/checkpoints/ckpt_00000002.pt", "svc/jobs/a/encoder/config.json",
                               "svc/jobs/ab/x.txt"]
    assert store.exists("jobs/a/encoder/config.json") and store.size("jobs/a/encoder/config.json") == len(data)
    assert not store.exists("jobs/a/encoder")  # a "folder" is not a key
    for missing in ("jobs/a/encoder", "jobs/a/nothing.pt"):
        with pytest.raises(FileNotFoundError):
            store.size(missing)
        with pytest.raises(Gone, match="no longer in the artifact store"):
            serve(store, Download(key=missing, filename="x"), Headers({}))
    with store.open("jobs/a/encoder/config.json") as fh:
        fh.seek(1000)
        assert fh.read(300) == data[1000:1300]
    assert store.list("jobs/a") == ["jobs/a/checkpoints/ckpt_00000002.pt", "jobs/a/encoder/config.json"]
    assert store.list("jobs/nothing") == []
    store.delete("jobs/a/encoder/config.json")
    store.delete("jobs/a/encoder/config.json")  # already gone: fine
    assert store.list("jobs/a") == ["jobs/a/checkpoints/ckpt_00000002.pt"]
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.list("jobs/../x")


def test_writes_and_deletes_by_another_host_are_seen_at_once(s3: S3, bucket: str, tmp_path: Path) -> None:
    store = _store(s3, bucket)
    (tmp_path / "f").write_bytes(b"one")
    store.put_file(tmp_path / "f", "jobs/j/checkpoints/ckpt_00000004.pt")
    assert store.list("jobs/j/checkpoints") == ["jobs/j/checkpoints/ckpt_00000004.pt"]  # fills fsspec's cache
    assert store.exists("jobs/j/checkpoints/ckpt_00000004.pt")
    # Another host (its own client) adds one checkpoint and prunes the other.
    s3.client.put_object(Bucket=bucket, Key="svc/jobs/j/checkpoints/ckpt_00000008.pt", Body=b"eight")
    s3.client.delete_object(Bucket=bucket, Key="svc/jobs/j/checkpoints/ckpt_00000004.pt")

    assert store.exists("jobs/j/checkpoints/ckpt_00000008.pt")
    assert store.size("jobs/j/checkpoints/ckpt_00000008.pt") == 5
    assert not store.exists("jobs/j/checkpoints/ckpt_00000004.pt")
    assert store.list("jobs/j/checkpoints") == ["jobs/j/checkpoints/ckpt_00000008.pt"]
    with store.open("jobs/j/checkpoints/ckpt_00000008.pt") as fh:
        assert fh.read() == b"eight"


def test_ping_accepts_an_empty_prefix_and_refuses_a_missing_bucket(s3: S3, bucket: str) -> None:
    assert _store(s3, bucket, "never/written/yet").ping()  # a fresh deployment: readiness must pass
    assert ArtifactStore(f"s3://{bucket}", s3.storage_options).ping()
    assert not _store(s3, "no-such-bucket-here").ping()


def _save(directory: Path, step: int, keep_last: int, final: bool = False) -> Path:
    manager = CheckpointManager(directory / "checkpoints", keep_last=keep_last)
    return manager.save({"w": torch.full((3,), float(step))}, step, final=final).path


def _checkpoint_keys(s3: S3, bucket: str, job: str) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in s3.keys(bucket, f"svc/jobs/{job}/checkpoints/")]


def test_pruned_checkpoints_leave_the_store_and_a_resumed_attempt_keeps_it_in_step(
        s3: S3, bucket: str, tmp_path: Path) -> None:
    store = _store(s3, bucket)
    host_a = JobOutputs(store, "job_1", tmp_path / "a")
    for step in (2, 4):
        host_a.publish_checkpoint(_save(host_a.directory, step, keep_last=2))
    assert _checkpoint_keys(s3, bucket, "job_1") == ["ckpt_00000002.json", "ckpt_00000002.pt",
                                                     "ckpt_00000004.json", "ckpt_00000004.pt"]
    host_a.publish_checkpoint(_save(host_a.directory, 6, keep_last=2))  # prunes step 2 locally
    assert _checkpoint_keys(s3, bucket, "job_1") == ["ckpt_00000004.json", "ckpt_00000004.pt",
                                                     "ckpt_00000006.json", "ckpt_00000006.pt"]

    # The next attempt runs on host B: it restores only the newest checkpoint, trains on, and from
    # then on the store holds what B's run directory holds (which is what B keeps recorded).
    host_b = JobOutputs(store, "job_1", tmp_path / "b")
    assert host_b.restore_checkpoint("jobs/job_1/checkpoints/ckpt_00000006.pt")
    host_b.publish_checkpoint(_save(host_b.directory, 8, keep_last=2))
    assert _checkpoint_keys(s3, bucket, "job_1") == ["ckpt_00000006.json", "ckpt_00000006.pt",
                                                     "ckpt_00000008.json", "ckpt_00000008.pt"]
    restored = CheckpointManager(tmp_path / "b" / "jobs" / "job_1" / "checkpoints").load(
        CheckpointManager(host_b.directory / "checkpoints").list()[0])
    assert torch.equal(restored["w"], torch.full((3,), 6.0))
    # Other jobs and other files of this job are never touched.
    (tmp_path / "other").write_bytes(b"x")
    store.put_file(tmp_path / "other", "jobs/job_2/checkpoints/ckpt_00000002.pt")
    store.put_file(tmp_path / "other", "jobs/job_1/metrics.jsonl")
    host_b.publish_checkpoint(_save(host_b.directory, 10, keep_last=1, final=True))
    assert store.exists("jobs/job_2/checkpoints/ckpt_00000002.pt") and store.exists("jobs/job_1/metrics.jsonl")
    assert _checkpoint_keys(s3, bucket, "job_1") == ["ckpt_00000008.json", "ckpt_00000008.pt",
                                                     "ckpt_00000010.json", "ckpt_00000010.pt"]


def test_a_failing_delete_is_logged_and_never_fails_the_job(s3: S3, bucket: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = _store(s3, bucket)
    outputs = JobOutputs(store, "job_1", tmp_path / "a")
    outputs.publish_checkpoint(_save(outputs.directory, 2, keep_last=1))

    def refuse(key: str) -> None:
        raise PermissionError(f"AccessDenied: {key}")

    monkeypatch.setattr(store, "delete", refuse)
    with caplog.at_level(logging.WARNING, logger="worker.outputs"):
        key = outputs.publish_checkpoint(_save(outputs.directory, 4, keep_last=1))
    assert key == "jobs/job_1/checkpoints/ckpt_00000004.pt" and store.exists(key)
    assert "could not delete pruned checkpoints under jobs/job_1/checkpoints" in caplog.text
    assert "AccessDenied" in caplog.text


def test_a_host_that_ran_an_earlier_attempt_catches_up_with_the_store(s3: S3, bucket: str, tmp_path: Path) -> None:
    store = _store(s3, bucket)

    def save(outputs: JobOutputs, step: int) -> tuple[int, str, str]:
        info = CheckpointManager(outputs.directory / "checkpoints").save({"w": torch.full((2,), float(step))}, step)
        return step, outputs.publish_checkpoint(info.path), info.sha256

    host_a, host_b = JobOutputs(store, "job_1", tmp_path / "a"), JobOutputs(store, "job_1", tmp_path / "b")
    records = [save(host_a, 4)]  # attempt 1 on A, handed back
    assert host_b.restore_newest(records) == records[0][1]  # attempt 2 on B starts from A's step 4
    records.append(save(host_b, 8))  # ... and is handed back at step 8
    assert host_a.restore_newest(records) == records[1][1]  # attempt 3, on A again: A had only step 4
    latest = CheckpointManager(host_a.directory / "checkpoints").latest_valid()
    assert latest is not None and (latest.step, latest.sha256) == (8, records[1][2])

    assert host_a.restore_newest(records) is None  # already here
    CheckpointManager(host_a.directory / "checkpoints").save({"w": torch.zeros(2)}, 12)
    assert host_a.restore_newest(records) is None  # the run directory is ahead (not yet recorded)
    store.delete(records[1][1])  # the newest record's file is gone: the next newest one is used
    host_c = JobOutputs(store, "job_1", tmp_path / "c")
    assert host_c.restore_newest(reversed(records)) == records[0][1]
    assert JobOutputs(ArtifactStore(str(tmp_path / "local")), "job_1", tmp_path / "d").restore_newest(records) is None
