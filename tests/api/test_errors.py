"""Bad requests, one per case, over real HTTP: each gets the exact status, an RFC 9457
problem+json body and a detail that says what is wrong; none of them changes the job store."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobstore.states import JobStatus
from simmim_service.settings import Settings
from tests.api.conftest import (
    ALICE,
    LiveApi,
    assert_problem,
    job_body,
    live_api,
    make_settings,
)
from tests.api.fakes import FakeDispatcher
from tests.api.pictures import png, png_header
from tests.api.store import job_ids, seed_checkpoint, seed_job


@dataclass
class World:
    """One app with a few valid jobs, shared by every bad request of this module."""

    live: LiveApi
    settings: Settings
    root: Path
    queued: str
    succeeded: str
    bob_job: str
    checkpoint: str
    checkpoint_size: int
    run: str
    store: set[tuple[str, str, str]]

    def client(self, key: str | None) -> httpx.Client:
        return self.live.client(key)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("errors")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'jobs.db'}")
    root = Path(settings.allowed_roots[0])
    (root / "escape").symlink_to(tmp)  # a link that leaves the allowed root
    # a list inside the allowed root that names an image outside it, once via '..'
    (root / "leaky.txt").write_text(f"digits/0/a.png\n{tmp}/secret.png\ndigits/../../secret.png\n")
    with live_api(settings, FakeDispatcher()) as live:
        alice = live.client(ALICE)
        queued = alice.post("/v1/jobs", json=job_body(settings), headers={"Idempotency-Key": "idem-1"}).json()["id"]
        succeeded = seed_job(live.sessions, status=JobStatus.SUCCEEDED)
        checkpoint, data = seed_checkpoint(live.sessions, live.artifacts, succeeded, size=1000)
        bob_job = seed_job(live.sessions, tenant="bob")
        run = alice.post(f"/v1/jobs/{succeeded}/embedding-runs", json={"dataset": str(root / "digits")})
        assert run.status_code == 202, run.text
        yield World(live, settings, root, queued, succeeded, bob_job, checkpoint, len(data), run.json()["id"],
                    job_ids(live.sessions))


Call = Callable[[World], httpx.Response]


def post_job(key: str | None = ALICE, headers: dict[str, str] | None = None, **changes: Any) -> Call:
    """POST /v1/jobs with a valid body changed by ``changes`` (``training`` merges)."""
    def call(w: World) -> httpx.Response:
        body = job_body(w.settings)
        for field, value in changes.items():
            body[field] = {**body["training"], **value} if field == "training" else value
            if value is None:
                del body[field]
        return w.client(key).post("/v1/jobs", json=body, headers=headers)
    return call


def dataset(path: Callable[[World], str]) -> Call:
    return lambda w: post_job(dataset=path(w))(w)


def embed_json(job: str, **body: Any) -> Call:
    payload = {"images": [base64.b64encode(png()).decode()], **body}
    return lambda w: w.client(ALICE).post(f"/v1/jobs/{getattr(w, job)}/embeddings", json=payload)


def embed_files(job: str, files: list[tuple[str, bytes]]) -> Call:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return lambda w: w.client(ALICE).post(f"/v1/jobs/{getattr(w, job)}/embeddings", files=parts)


def get(path: str, key: str | None = ALICE, **kwargs: Any) -> Call:
    return lambda w: w.client(key).get(path.format(**vars(w)), **kwargs)


CASES: list[tuple[str, Call, int, tuple[str, ...]]] = [
    ("malformed-json", lambda w: w.client(ALICE).post("/v1/jobs", content=b'{"dataset": ',
                                                      headers={"content-type": "application/json"}),
     422, ("malformed JSON",)),
    ("json-array-body", lambda w: w.client(ALICE).post("/v1/jobs", json=[1, 2]), 422, ("dict",)),
    ("wrong-type", post_job(training={"batch_size": "big"}), 422, ("training.batch_size", "integer")),
    ("unknown-field", post_job(colour="red"), 422, ("colour", "Extra inputs")),
    ("missing-dataset", post_job(dataset=None), 422, ("dataset", "Field required")),
    ("size-not-divisible", post_job(training={"image_size": 36}), 422, ("training.mask_patch_size", "36")),
    ("mask-ratio-1.5", post_job(training={"mask_ratio": 1.5}), 422, ("training.mask_ratio", "1.5")),
    ("negative-batch", post_job(training={"batch_size": -4}), 422, ("training.batch_size", "-4")),
    ("unknown-model", post_job(training={"model": "vit_tiny_patch16_244"}), 422,
     ("training.model", "did you mean", "vit_tiny_patch16_224")),
    ("path-traversal", dataset(lambda w: f"{w.root}/digits/../../etc"), 422, ("'..' is not allowed",)),
    ("relative-path", dataset(lambda w: "datasets/digits"), 422, ("must be absolute",)),
    ("symlink-escape", dataset(lambda w: f"{w.root}/escape"), 422, ("outside the allowed dataset roots",)),
    ("nonexistent-dataset", dataset(lambda w: f"{w.root}/missing"), 422, ("does not exist",)),
    ("list-names-images-outside", dataset(lambda w: f"{w.root}/leaky.txt"), 422,
     ("leaky.txt", "names 2 image(s) outside the allowed dataset roots", "secret.png")),
    ("unsupported-scheme", dataset(lambda w: "ftp://host/images.tar"), 422, ("unsupported scheme",)),
    ("http-not-archive", dataset(lambda w: "https://host/images/"), 422, (".tar", "archive")),
    ("no-key", post_job(key=None), 401, ("Authorization: Bearer",)),
    ("wrong-key", post_job(key="key-mallory"), 401, ("invalid API key",)),
    ("not-bearer", lambda w: w.client(None).get("/v1/jobs", headers={"Authorization": "Basic YTpi"}), 401,
     ("expected 'Bearer <key>'",)),
    ("other-tenants-job", get("/v1/jobs/{bob_job}"), 404, ("not found",)),
    ("unknown-job", get("/v1/jobs/job_00000000000000000000"), 404, ("job_00000000000000000000",)),
    ("unknown-checkpoint", get("/v1/jobs/{succeeded}/checkpoints/ckpt_nope/content"), 404, ("ckpt_nope",)),
    ("cancel-finished", lambda w: w.client(ALICE).post(f"/v1/jobs/{w.succeeded}/cancel"), 409, ("succeeded",)),
    ("embed-unfinished-job", embed_json("queued"), 409, ("queued", "succeeded job")),
    ("embed-unknown-checkpoint", embed_json("queued", checkpoint_id="ckpt_nope"), 404, ("ckpt_nope",)),
    ("embed-no-key", lambda w: w.client(None).post(f"/v1/jobs/{w.succeeded}/embeddings",
                                                   files=[("files", ("a.png", png(), "image/png"))]),
     401, ("Authorization: Bearer",)),
    ("embed-unknown-job", lambda w: w.client(ALICE).post("/v1/jobs/job_00000000000000000000/embeddings",
                                                         json={"images": [base64.b64encode(png()).decode()]}),
     404, ("job_00000000000000000000",)),
    ("too-many-images", embed_files("succeeded", [(f"{i}.png", png()) for i in range(5)]), 413,
     ("5 images", "limit is 4")),
    ("far-too-many-images", embed_files("succeeded", [(f"{i}.png", png()) for i in range(9)]), 413,
     ("more than 4 images",)),
    ("no-files", lambda w: w.client(ALICE).post(f"/v1/jobs/{w.succeeded}/embeddings",
                                                files={"pooling": (None, "mean")}), 422, ("files",)),
    ("too-many-image-bytes", embed_files("succeeded", [("a.bin", png()), ("b.bin", os.urandom(210_000))]),
     413, ("limit is 200000",)),
    ("body-too-large", lambda w: w.client(ALICE).post("/v1/jobs", content=b"x" * 1_300_000,
                                                      headers={"content-type": "application/json"}),
     413, ("exceeds the limit of 1248576",)),
    ("non-image-file", embed_files("succeeded", [("ok.png", png()), ("notes.txt", b"hello, not a picture")]),
     422, ("files[1]", "notes.txt", "not a readable image")),
    ("png-bomb-header", embed_files("succeeded", [("bomb.png", png_header(100_000, 100_000))]), 422,
     ("files[0]", "bomb.png", "decompression bomb")),
    ("png-over-pixel-limit", embed_files("succeeded", [("big.png", png_header(5000, 5000))]), 422,
     ("5000x5000", "limit is 16777216")),
    ("invalid-base64", lambda w: w.client(ALICE).post(f"/v1/jobs/{w.succeeded}/embeddings",
                                                      json={"images": ["not base64!"]}), 422,
     ("images[0]", "base64")),
    ("bad-pooling", embed_json("succeeded", pooling="max"), 422, ("pooling", "'mean' or 'cls'")),
    ("bad-pooling-multipart", lambda w: w.client(ALICE).post(
        f"/v1/jobs/{w.succeeded}/embeddings", files=[("files", ("a.png", png(), "image/png"))],
        data={"pooling": "max"}), 422, ("pooling",)),
    ("embed-wrong-media-type", lambda w: w.client(ALICE).post(f"/v1/jobs/{w.succeeded}/embeddings",
                                                              content=png(), headers={"content-type": "image/png"}),
     415, ("multipart/form-data",)),
    ("limit-0", get("/v1/jobs", params={"limit": 0}), 422, ("query.limit", "greater than or equal to 1")),
    ("limit-1000", get("/v1/jobs", params={"limit": 1000}), 422, ("query.limit", "less than or equal to 100")),
    ("bad-status-filter", get("/v1/jobs", params={"status": "done"}), 422, ("query.status", "'queued'")),
    ("bad-cursor", get("/v1/jobs", params={"after": "'; drop table jobs"}), 422, ("query.after",)),
    ("bad-range", get("/v1/jobs/{succeeded}/checkpoints/{checkpoint}/content", headers={"Range": "bytes=5000-"}),
     416, ("outside the file", "1000 bytes")),
    ("bad-idempotency-reuse", post_job(headers={"Idempotency-Key": "idem-1"}, name="changed"), 422,
     ("Idempotency-Key", "different request body")),
    ("bad-last-event-id", get("/v1/jobs/{queued}/events", headers={"Last-Event-ID": "abc"}), 422,
     ("header.Last-Event-ID",)),
    ("bad-max-points", get("/v1/jobs/{queued}/metrics", params={"key": "loss", "max_points": 0}), 422,
     ("query.max_points",)),
    ("unknown-embedding-run", get("/v1/jobs/{succeeded}/embedding-runs/emb_nope"), 404, ("emb_nope",)),
    ("run-files-not-ready", get("/v1/jobs/{succeeded}/embedding-runs/{run}/embeddings"), 409, ("queued",)),
    ("embedding-run-bad-dataset", lambda w: w.client(ALICE).post(f"/v1/jobs/{w.succeeded}/embedding-runs",
                                                                 json={"dataset": "relative/dir"}), 422,
     ("dataset", "absolute")),
    ("embedding-run-list-outside", lambda w: w.client(ALICE).post(f"/v1/jobs/{w.succeeded}/embedding-runs",
                                                                  json={"dataset": f"{w.root}/leaky.txt"}), 422,
     ("dataset", "outside the allowed dataset roots")),
    ("unknown-route", get("/v1/nothing-here"), 404, ("no route GET /v1/nothing-here",)),
    ("method-not-allowed", lambda w: w.client(ALICE).delete("/v1/jobs"), 405, ("DELETE", "allowed: POST")),
]


@pytest.mark.parametrize(("case", "call", "status", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_request(world: World, case: str, call: Call, status: int, needles: tuple[str, ...]) -> None:
    response = call(world)
    body = assert_problem(response, status, *needles)
    if status == 422:
        assert body["errors"], "a 422 lists every invalid field"
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if status == 416:
        assert response.headers["content-range"] == f"bytes */{world.checkpoint_size}"
    assert job_ids(world.live.sessions) == world.store, "a bad request changed the job store"


def test_every_problem_is_reported_at_once(world: World) -> None:
    bad = post_job(dataset="relative", training={"model": "nope_model", "mask_ratio": 2})(world)
    body = assert_problem(bad, 422)
    assert {e["field"] for e in body["errors"]} == {"dataset", "training.model", "training.mask_ratio"}


def test_no_request_reached_the_broker_except_the_valid_ones(world: World) -> None:
    fake = world.live.dispatcher
    assert fake.pretrain == [world.queued] and fake.embed_calls == []
    assert fake.embedding_runs == [(world.succeeded, world.run)]
    assert len(CASES) >= 40
