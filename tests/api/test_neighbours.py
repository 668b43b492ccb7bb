"""``POST /v1/jobs/{id}/neighbours`` and ``GET /v1/jobs/{id}/dataset-images/{i}`` over real HTTP.

The fake dispatcher embeds an image as a hash of its bytes, and the embedding run is written
the way the worker writes it, so an uploaded copy of dataset image ``i`` must find ``i`` first
with cosine similarity 1.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from jobstore import repo
from jobstore.states import JobStatus
from tests.api.conftest import ALICE, LiveApi, assert_problem
from tests.api.fakes import FakeDispatcher, fake_vector
from tests.api.pictures import png
from tests.api.store import move, start

COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 10), (10, 200, 200), (90, 90, 90)]


def make_dataset(root: Path) -> list[Path]:
    files = []
    for i, color in enumerate(COLORS):
        path = root / f"class{i % 2}" / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(24 + i, color))
        files.append(path)
    (root / "class0" / "notes.txt").write_text("not an image")
    return files


def succeeded_job(api: LiveApi, dataset: str, tenant: str = "alice") -> str:
    with api.sessions.begin() as s:
        job, _ = repo.create_job(s, tenant=tenant, spec={"dataset": dataset, "training": {}})
        job_id = job.id
    attempt = start(api.sessions, job_id)
    move(api.sessions, job_id, attempt, JobStatus.RUNNING)
    move(api.sessions, job_id, attempt, JobStatus.SUCCEEDED)
    return job_id


def write_run(api: LiveApi, job_id: str, dataset: str, names: list[str], blobs: list[bytes | None],
              options: dict[str, Any] | None = None) -> str:
    """A succeeded run with the fake embedding of every image (a zero row for unreadable ones)."""
    matrix = np.array([fake_vector(b) if b is not None else [0.0] * 8 for b in blobs], dtype=np.float32)
    with api.sessions.begin() as s:
        run = repo.create_embedding_run(s, job_id=job_id, dataset=dataset, options=options or {"pooling": "mean"})
        run_id = run.id
    prefix = f"jobs/{job_id}/embeddings/{run_id}"
    out = api.artifacts.local_path(prefix)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", matrix)
    (out / "files.txt").write_text("".join(n + "\n" for n in names))
    with api.sessions.begin() as s:
        repo.update_embedding_run(s, run_id=run_id, status=JobStatus.SUCCEEDED, count=len(names),
                                  embeddings_key=f"{prefix}/embeddings.npy", files_key=f"{prefix}/files.txt")
    return run_id


def test_neighbours_need_a_run_then_find_the_same_image_first(api: LiveApi, alice: httpx.Client,
                                                               bob: httpx.Client, fake: FakeDispatcher) -> None:
    root = Path(api.settings.allowed_roots[0]) / "shapes"
    files = make_dataset(root)
    job_id = succeeded_job(api, str(root))
    query = files[3].read_bytes()
    upload = {"files": ("mine.png", query, "image/png")}

    missing = assert_problem(alice.post(f"/v1/jobs/{job_id}/neighbours", files=upload), 409, "embedding-runs")
    assert missing["embedding_run"] is None and missing["dataset"] == str(root)
    assert fake.embed_calls == []

    names = [str(p.relative_to(root)) for p in files]
    blobs: list[bytes | None] = [p.read_bytes() for p in files]
    blobs[5] = None  # unreadable during the run: a zero row, never a neighbour
    run_id = write_run(api, job_id, str(root), names, blobs)
    answer = alice.post(f"/v1/jobs/{job_id}/neighbours", params={"k": 3}, files=upload)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["run_id"] == run_id and body["k"] == 3 and body["count"] == 6 and body["dataset"] == str(root)
    (item,) = body["data"]
    assert item["name"] == "mine.png" and len(item["neighbours"]) == 3
    first = item["neighbours"][0]
    assert first["index"] == 3 and first["name"] == names[3] and abs(first["score"] - 1.0) < 1e-5
    scores = [n["score"] for n in item["neighbours"]]
    assert scores == sorted(scores, reverse=True) and 5 not in [n["index"] for n in item["neighbours"]]
    assert first["thumbnail_url"] == f"/v1/jobs/{job_id}/dataset-images/3?run_id={run_id}"
    payload, _ = fake.embed_calls[-1]
    assert payload["pooling"] == "mean" and payload["checkpoint_id"] is None and payload["layer"] is None

    thumb = alice.get(first["thumbnail_url"], params={"size": 16})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(thumb.content))
    assert image.size == (16, 16) and image.convert("RGB").getpixel((8, 8)) == COLORS[3]
    full = Image.open(io.BytesIO(alice.get(f"/v1/jobs/{job_id}/dataset-images/0").content))
    assert full.size == (24, 24)  # never enlarged

    assert_problem(alice.get(f"/v1/jobs/{job_id}/dataset-images/6"), 404, "6 images")
    assert_problem(bob.get(f"/v1/jobs/{job_id}/dataset-images/0"), 404)
    assert_problem(bob.post(f"/v1/jobs/{job_id}/neighbours", files=upload), 404)
    assert_problem(alice.get(f"/v1/jobs/{job_id}/dataset-images/0", params={"run_id": "emb_nope"}), 404)
    wrong = alice.post(f"/v1/jobs/{job_id}/neighbours", files=upload, data={"pooling": "cls"})
    assert_problem(wrong, 422, "pooling")
    assert_problem(alice.post(f"/v1/jobs/{job_id}/neighbours", params={"k": 0}, files=upload), 422, "k")
    assert alice.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/neighbours"]["post"]


def test_only_listed_files_of_local_datasets_are_served(api: LiveApi, alice: httpx.Client) -> None:
    root = Path(api.settings.allowed_roots[0])
    archive = root / "shapes.tar"
    with tarfile.open(archive, "w") as tar:
        for i, color in enumerate(COLORS[:3]):
            data = png(20, color)
            info = tarfile.TarInfo(f"imgs/{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    job_id = succeeded_job(api, str(archive))
    names = [f"imgs/{i}.png" for i in range(3)]
    write_run(api, job_id, str(archive), [*names, "imgs/gone.png"], [png(20, c) for c in COLORS[:3]] + [png()])
    tile = alice.get(f"/v1/jobs/{job_id}/dataset-images/2")
    assert tile.status_code == 200
    assert Image.open(io.BytesIO(tile.content)).convert("RGB").getpixel((5, 5)) == COLORS[2]
    assert_problem(alice.get(f"/v1/jobs/{job_id}/dataset-images/3"), 404, "no longer")

    remote = succeeded_job(api, "s3://bucket/images/")
    write_run(api, remote, "s3://bucket/images/", ["a.png"], [png()])
    assert_problem(alice.get(f"/v1/jobs/{remote}/dataset-images/0"), 409, "remote")


def test_running_run_and_unfinished_job_are_conflicts(api: LiveApi, alice: httpx.Client) -> None:
    root = Path(api.settings.allowed_roots[0]) / "digits"
    job_id = succeeded_job(api, str(root))
    with api.sessions.begin() as s:
        run = repo.create_embedding_run(s, job_id=job_id, dataset=str(root), options={})
        run_id = run.id
    upload = {"files": ("a.png", png(), "image/png")}
    pending = assert_problem(alice.post(f"/v1/jobs/{job_id}/neighbours", files=upload), 409, run_id)
    assert pending["embedding_run"] == {"id": run_id, "status": "queued"}
    with api.sessions.begin() as s:
        queued, _ = repo.create_job(s, tenant="alice", spec={"dataset": str(root), "training": {}})
    assert_problem(alice.post(f"/v1/jobs/{queued.id}/neighbours", files=upload), 409, "queued")


def test_python_client_starts_runs_finds_neighbours_and_fetches_images(api: LiveApi, fake: FakeDispatcher,
                                                                        tmp_path: Path) -> None:
    from simmim_service.client import APIError, SimMIMClient

    root = Path(api.settings.allowed_roots[0]) / "shapes"
    files = make_dataset(root)
    job_id = succeeded_job(api, str(root))
    with SimMIMClient(api.url, api_key=ALICE) as client:
        try:
            client.neighbours(job_id, [files[0]])
        except APIError as err:
            assert err.status == 409 and err.problem["embedding_run"] is None
        else:
            raise AssertionError("neighbours without an embedding run must be a 409")
        queued = client.start_embedding_run(job_id, str(root), normalize=True)
        assert fake.embedding_runs == [(job_id, queued["id"])]
        assert client.embedding_run(job_id, queued["id"])["status"] == "queued"
        run_id = write_run(api, job_id, str(root), [str(p.relative_to(root)) for p in files],
                           [p.read_bytes() for p in files])
        assert client.wait_embedding_run(job_id, run_id, timeout=5)["status"] == "succeeded"
        found = client.neighbours(job_id, [files[2], files[4]], k=2)
        assert [item["neighbours"][0]["index"] for item in found["data"]] == [2, 4]
        thumb = client.dataset_image(job_id, 4, run_id=run_id, size=16)
        assert Image.open(io.BytesIO(thumb)).convert("RGB").getpixel((3, 3)) == COLORS[4]
