"""Scale-out: two worker "hosts" share one broker, one job store and one S3 artifact store.

Each host is a real Celery worker process with its own scratch directory (``SIMMIM_WORK_DIR``)
and node name; both consume the same ``train`` queue on one Redis, record into one PostgreSQL
job store and publish to ``s3://<bucket>/svc`` on moto's S3 server. The API, a third "host",
serves downloads from S3 and answers embedding requests through the workers.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import pytest

from jobstore import repo
from jobstore.models import Checkpoint, Job
from jobstore.states import TERMINAL, JobStatus
from simmim_service.client import SimMIMClient
from tests.api.conftest import live_api
from tests.s3 import S3, s3_server
from tests.services import postgres_database, redis_server
from tests.worker.stack import Stack, celery_worker, make_stack

pytestmark = pytest.mark.slow

PREFIX = "svc"
KEY = "scale-out-key"
HOSTS = ("hosta", "hostb")
SMALL = {"max_steps": 6, "checkpoint_every": 2, "keep_last": 1}
"""Checkpoints at steps 2, 4 and 6 (final); keep_last=1 prunes step 2 when step 4 is written."""
EXPECTED_FILES = {"checkpoints/ckpt_00000004.pt", "checkpoints/ckpt_00000004.json",
                  "checkpoints/ckpt_00000006.pt", "checkpoints/ckpt_00000006.json",
                  "config.json", "metrics.jsonl", "encoder/encoder.safetensors", "encoder/config.json"}
PREVIEWS = {"previews/step_00000002.png", "previews/step_00000004.png", "previews/step_00000006.png"}


@dataclass
class Hosts:
    stack: Stack
    """The API host's view: settings with the S3 store, the job store, the sending Celery app."""
    s3: S3
    bucket: str
    workers: dict[str, tuple[Path, Popen[bytes]]]
    """Node name -> (its SIMMIM_WORK_DIR, its Celery worker process)."""
    digits: dict[str, Path]

    def object_key(self, key: str) -> str:
        return f"{PREFIX}/{key}"

    @staticmethod
    def host_of(record: Any) -> str:
        """The node name of a job's or an attempt's ``worker`` (``hosta@machine[pid]``)."""
        return str(record.worker or "").split("@", 1)[0]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, Path]) -> Iterator[Hosts]:
    workdir = tmp_path_factory.mktemp("scale_out")
    with ExitStack() as resources:
        s3 = resources.enter_context(s3_server())
        database_url = resources.enter_context(postgres_database())
        redis_url = resources.enter_context(redis_server(workdir))
        bucket = s3.new_bucket()
        stack = make_stack(workdir, database_url, redis_url)
        resources.callback(stack.close)
        stack.settings = stack.settings.model_copy(update={
            "artifact_root": f"s3://{bucket}/{PREFIX}", "artifact_storage_options": s3.storage_options,
            "dataset_storage_options": s3.storage_options, "work_dir": str(workdir / "api" / "work"),
            "api_keys": {KEY: "t"}, "auth_required": True})
        workers = {}
        for name in HOSTS:  # each waits until its worker answers a ping: both consume before any submit
            own = stack.settings.model_copy(update={"work_dir": str(workdir / name / "work")})
            proc = resources.enter_context(celery_worker(replace(stack, settings=own), name))
            workers[name] = (Path(own.work_dir), proc)
        yield Hosts(stack, s3, bucket, workers, digits)


def _wait_all(stack: Stack, job_ids: list[str], timeout: float) -> dict[str, Job]:
    return {j: stack.wait_for(j, lambda job: job.status in TERMINAL, timeout=timeout) for j in job_ids}


def _records(stack: Stack, job_id: str) -> list[Checkpoint]:
    return stack.read(lambda s: repo.list_checkpoints(s, job_id=job_id))


def _logs(stack: Stack, job_id: str) -> list[str]:
    return [e.data["message"] for e in stack.read(lambda s: repo.list_events(s, job_id=job_id)) if e.type == "log"]


def _record_text(stack: Stack, job_id: str) -> str:
    """Everything the job store holds about a job, as one string."""
    def read(s: Any) -> list[Any]:
        job = repo.get_job(s, job_id=job_id)
        return [{c.name: getattr(job, c.name) for c in Job.__table__.columns},
                [e.data for e in repo.list_events(s, job_id=job_id)],
                [(a.worker, a.reason) for a in repo.list_attempts(s, job_id=job_id)],
                [(c.uri, c.sha256, c.kind) for c in repo.list_checkpoints(s, job_id=job_id)]]
    return json.dumps(stack.read(read), default=str)


def test_two_hosts_share_the_queue_and_each_job_lives_under_its_own_prefix(hosts: Hosts, tmp_path: Path) -> None:
    stack, s3, bucket = hosts.stack, hosts.s3, hosts.bucket
    assert all(proc.poll() is None for _, proc in hosts.workers.values())
    # One job reads its dataset from the bucket too: each host fetches it into its own scratch space.
    for path in sorted(hosts.digits["train"].rglob("*.png"))[:64]:
        s3.client.upload_file(str(path), bucket, f"datasets/digits/{path.parent.name}/{path.name}")
    jobs = [stack.create_job(hosts.digits["train"], **SMALL) for _ in range(3)]
    jobs.append(stack.create_job(f"s3://{bucket}/datasets/digits/", **SMALL))
    for job_id in jobs:
        stack.submit(job_id)

    done = _wait_all(stack, jobs, timeout=150)
    for job_id, job in done.items():
        assert job.status == JobStatus.SUCCEEDED, (job_id, job.error_message, stack.worker_logs())
    ran_on = {job_id: hosts.host_of(job) for job_id, job in done.items()}
    assert set(ran_on.values()) == set(HOSTS), ran_on  # the queue's work was shared

    # The bucket: every job's files under svc/jobs/<its id>/, exactly its run's files (pruned step 2
    # deleted), and nothing else under the prefix.
    listed = s3.keys(bucket, PREFIX + "/")
    by_job: dict[str, set[str]] = {}
    for key in listed:
        parts = key.split("/", 3)
        assert parts[:2] == [PREFIX, "jobs"] and parts[2] in jobs, key
        by_job.setdefault(parts[2], set()).add(parts[3])
    # Previews stay for every checkpoint (also the pruned step 2); TensorBoard event files are
    # named by time, host and pid.
    for job_id, names in by_job.items():
        events = {n for n in names if n.startswith("tensorboard/events.out.tfevents.")}
        assert events, (job_id, sorted(names))
        assert names - events == EXPECTED_FILES | PREVIEWS, (job_id, sorted(names))
    assert set(by_job) == set(jobs)

    # Finished jobs leave nothing in a host's scratch space: their files are in the bucket.
    for name, (work_dir, _) in hosts.workers.items():
        assert not list((work_dir / "jobs").glob("*")), (name, list((work_dir / "jobs").glob("*")))
        assert any(host == name for host in ran_on.values())

    # Job records: relative keys whose content (sha256, size) is what S3 holds; no host's path anywhere.
    host_dirs = [str(work_dir.parent) for work_dir, _ in hosts.workers.values()]
    for job_id in jobs:
        records = _records(stack, job_id)
        assert sorted((r.kind, r.step, r.final) for r in records) == [
            ("checkpoint", 4, False), ("checkpoint", 6, True), ("encoder", 6, True)]
        for record in records:
            assert record.uri.startswith(f"jobs/{job_id}/") and "://" not in record.uri, record.uri
            assert not Path(record.uri).is_absolute() and ".." not in record.uri.split("/")
            data = s3.read(bucket, hosts.object_key(record.uri))
            assert hashlib.sha256(data).hexdigest() == record.sha256 and len(data) == record.size
        text = _record_text(stack, job_id)
        assert not [d for d in host_dirs if d in text], text

    # The API (another host) streams artifacts from S3 and embeds through the workers.
    test_images = sorted(hosts.digits["test"].rglob("*.png"))[:3]
    with live_api(stack.settings) as api, SimMIMClient(api.url, api_key=KEY) as client:
        ready = httpx.get(f"{api.url}/readyz", timeout=20)
        assert ready.status_code == 200 and ready.json()["checks"]["artifacts"] == "ok", ready.text
        for job_id in (next(j for j in jobs if ran_on[j] == name) for name in HOSTS):
            listing = client.checkpoints(job_id)
            encoder = next(c for c in listing if c["kind"] == "encoder")
            final = next(c for c in listing if c["kind"] == "checkpoint" and c["final"])
            uris = {r.id: r.uri for r in _records(stack, job_id)}
            for item in (encoder, final):
                got = client.download(job_id, item, tmp_path / f"{job_id}-{item['id']}")  # verifies sha256
                assert got.read_bytes() == s3.read(bucket, hosts.object_key(uris[item["id"]]))
            partial = httpx.get(f"{api.url}/v1/jobs/{job_id}/checkpoints/{encoder['id']}/content",
                                headers={"Authorization": f"Bearer {KEY}", "Range": "bytes=100-163"}, timeout=20)
            whole = s3.read(bucket, hosts.object_key(f"jobs/{job_id}/encoder/encoder.safetensors"))
            assert partial.status_code == 206 and partial.content == whole[100:164]
            assert partial.headers["content-range"] == f"bytes 100-163/{len(whole)}"
            served = client.embed(job_id, test_images)
            assert served["dim"] == 48 and len(served["data"]) == len(test_images)
            assert all(len(row["embedding"]) == 48 for row in served["data"])
    assert not Path(stack.settings.work_dir).exists()  # the API host streamed from S3, wrote nothing


def test_a_job_handed_back_by_one_host_resumes_on_the_other_from_s3(hosts: Hosts) -> None:
    stack, s3, bucket = hosts.stack, hosts.s3, hosts.bucket
    assert all(proc.poll() is None for _, proc in hosts.workers.values())
    job_id = stack.create_job(hosts.digits["train"], max_steps=40, checkpoint_every=1000)
    stack.submit(job_id)
    job = stack.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 3, timeout=90)
    first = hosts.host_of(job)
    (second,) = set(HOSTS) - {first}
    first_dir, first_proc = hosts.workers[first]
    first_proc.send_signal(signal.SIGTERM)  # warm shutdown: checkpoint, upload, hand the job back
    assert first_proc.wait(timeout=60) == 0, stack.worker_logs()

    # The other host may already have taken the job back up: read what the first one left in the store.
    events = stack.read(lambda s: repo.list_events(s, job_id=job_id))
    handed = [e.data for e in events if e.type == "log" and e.data["message"].startswith("worker shutting down")]
    assert len(handed) == 1 and handed[0]["attempt"] == 1, stack.worker_logs()
    stopped_at = handed[0]["step"]
    assert 3 <= stopped_at < 40
    (handed_back,) = [c for c in _records(stack, job_id)
                      if c.step == stopped_at]
    assert not handed_back.final
    assert hashlib.sha256(s3.read(bucket, hosts.object_key(handed_back.uri))).hexdigest() == handed_back.sha256

    job = stack.wait_for(job_id, lambda j: j.status in TERMINAL, timeout=120)
    assert job.status == JobStatus.SUCCEEDED, (job.error_message, stack.worker_logs())
    assert job.attempt == 2 and hosts.host_of(job) == second and job.progress["step"] == 40
    attempts = stack.read(lambda s: repo.list_attempts(s, job_id=job_id))
    assert [hosts.host_of(a) for a in attempts] == [first, second]
    assert f"resuming from the checkpoint at step {stopped_at}" in _logs(stack, job_id)
    statuses = [e.data["status"] for e in stack.read(lambda s: repo.list_events(s, job_id=job_id)) if e.type == "status"]
    assert statuses == ["queued", "validating", "running", "recovering", "validating", "running", "succeeded"]
    losses = stack.read(lambda s: repo.metric_history(s, job_id=job_id, key="loss"))
    steps = [p.step for p in losses]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step trained twice
    # The second host resumed from the checkpoint in S3 (it never saw this job before the hand-back:
    # the "resuming" line above is its attempt's), finished, and deleted its scratch copy.
    second_dir, _ = hosts.workers[second]
    assert not (first_dir / "jobs" / job_id / "checkpoints" / "ckpt_00000040.pt").exists()
    assert not (second_dir / "jobs" / job_id).exists()
    # The bucket keeps the handed-back checkpoint and the final one.
    remote = sorted(k.rsplit("/", 1)[1] for k in s3.keys(bucket, f"{PREFIX}/jobs/{job_id}/checkpoints/"))
    assert remote == sorted(f"ckpt_{s:08d}.{ext}" for s in (stopped_at, 40) for ext in ("json", "pt"))
    records = _records(stack, job_id)
    assert sorted(r.uri.rsplit("/", 1)[1] for r in records if r.kind == "checkpoint") == [
        f"ckpt_{stopped_at:08d}.pt", "ckpt_00000040.pt"]
    assert not [d for d in (str(first_dir.parent), str(second_dir.parent)) if d in _record_text(stack, job_id)]


def test_a_cancelled_job_uploads_its_logs_and_leaves_no_scratch(hosts: Hosts) -> None:
    stack, s3, bucket = hosts.stack, hosts.s3, hosts.bucket
    job_id = stack.create_job(hosts.digits["train"], max_steps=500, checkpoint_every=1000)
    stack.submit(job_id)
    job = stack.wait_for(job_id, lambda j: j.progress.get("step", 0) >= 2, timeout=90)
    host = hosts.host_of(job)
    with stack.sessions.begin() as s:
        repo.request_cancel(s, job_id=job_id)
    job = stack.wait_for(job_id, lambda j: j.status in TERMINAL, timeout=60)
    assert job.status == JobStatus.CANCELLED, (job.error_message, stack.worker_logs())
    names = {k.split(f"/jobs/{job_id}/", 1)[1] for k in s3.keys(bucket, f"{PREFIX}/jobs/{job_id}/")}
    # the stop checkpoint, and the run's logs (a succeeded job uploads them as it finishes; this one
    # did when it was cancelled, before its scratch copy went)
    (stop,) = [c for c in _records(stack, job_id) if c.kind == "checkpoint"]
    assert {f"checkpoints/ckpt_{stop.step:08d}.pt", "config.json", "metrics.jsonl"} <= names, sorted(names)
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names), sorted(names)
    deadline = time.monotonic() + 10  # the status is written before the scratch copy is deleted
    while (hosts.workers[host][0] / "jobs" / job_id).exists():
        assert time.monotonic() < deadline, "the cancelled job's scratch copy is still there"
        time.sleep(0.1)
