"""Nearest neighbours of uploaded images among a job's dataset, and that dataset's images.

The dataset side comes from an embedding run (``embeddings.npy`` + ``files.txt``) of the job's
own training dataset: the newest succeeded one unless the caller names a run. Uploaded images
are embedded through the ordinary embed path (an embed worker, with the run's pooling and
layer), then compared by cosine similarity with numpy. No torch in the API.

Dataset images (thumbnails) are read with the same source rules as the workers
(``simmim.data.sources.open_source``: folders, list files, tar/zip read in place with their
safety checks) and only for names listed in the run's ``files.txt``; remote datasets (http,
s3) are not read by the API.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.dispatch import Dispatcher
from api.errors import BadGateway, Conflict, NotFound, Unprocessable
from api.images import EmbeddingInput
from api.schemas.embeddings import EmbeddingForm
from api.services.jobs import get_job
from jobstore import repo
from jobstore.models import EmbeddingRun, Job
from jobstore.states import JobStatus
from simmim_service.artifacts import ArtifactStore
from simmim_service.settings import Settings

CACHED_RUNS = 4
"""Embedding matrices kept in memory per API process (runs never change once succeeded)."""
CACHED_SOURCES = 4
THUMBNAIL_MAX = 512


@dataclass(frozen=True)
class RunIndex:
    """A succeeded run's unit-length rows (zero rows for unreadable images stay zero) and names."""

    run_id: str
    dataset: str
    vectors: np.ndarray
    valid: np.ndarray
    names: list[str]


class _LRU:
    def __init__(self, size: int) -> None:
        self.size, self.items, self.lock = size, OrderedDict[str, Any](), threading.Lock()

    def get(self, key: str) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key: str, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_runs = _LRU(CACHED_RUNS)
_sources = _LRU(CACHED_SOURCES)


def job_dataset(job: Job) -> str:
    return str((job.spec or {}).get("dataset", ""))


def choose_run(session: Session, job: Job, run_id: str | None) -> EmbeddingRun:
    """The named run, or the newest succeeded run of the job's dataset; 409 says what to do."""
    if run_id is not None:
        run = repo.get_embedding_run(session, job_id=job.id, run_id=run_id)
        if run is None:
            raise NotFound(f"job {job.id} has no embedding run {run_id!r}")
        if run.status != JobStatus.SUCCEEDED:
            raise Conflict(f"embedding run {run_id} is {run.status}; neighbours need a succeeded run",
                           embedding_run={"id": run.id, "status": run.status})
        return run
    dataset = job_dataset(job)
    runs = repo.embedding_runs_of(session, job_id=job.id, dataset=dataset)
    done = next((r for r in runs if r.status == JobStatus.SUCCEEDED), None)
    if done is not None:
        return done
    pending = next((r for r in runs if r.status in (JobStatus.QUEUED, JobStatus.RUNNING)), None)
    if pending is not None:
        raise Conflict(f"the embedding run {pending.id} of the job's dataset is {pending.status}; "
                       "ask again once it has succeeded", embedding_run={"id": pending.id, "status": pending.status},
                       dataset=dataset)
    raise Conflict(f"job {job.id} has no succeeded embedding run of its dataset {dataset}; start one with "
                   f"POST /v1/jobs/{job.id}/embedding-runs {{\"dataset\": \"{dataset}\"}} and ask again when "
                   "it has succeeded", dataset=dataset, embedding_run=None)


def load_index(artifacts: ArtifactStore, run: EmbeddingRun) -> RunIndex:
    cached: RunIndex | None = _runs.get(run.id)
    if cached is not None:
        return cached
    if run.embeddings_key is None or run.files_key is None:
        raise Conflict(f"embedding run {run.id} has no result files")
    try:
        with artifacts.open(run.embeddings_key) as fh:
            matrix = np.load(io.BytesIO(fh.read()), allow_pickle=False).astype(np.float32, copy=False)
        with artifacts.open(run.files_key) as fh:
            names = fh.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise NotFound(f"the files of embedding run {run.id} are gone from the artifact store") from None
    if matrix.ndim != 2 or matrix.shape[0] != len(names):
        raise BadGateway(f"embedding run {run.id}: {matrix.shape} embeddings for {len(names)} names")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    valid = norms[:, 0] > 0
    vectors = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    index = RunIndex(run_id=run.id, dataset=run.dataset, vectors=vectors, valid=valid, names=names)
    _runs.put(run.id, index)
    return index


def _check_options(form: EmbeddingForm, run: EmbeddingRun) -> None:
    """Uploads are embedded exactly as the run embedded the dataset; other options are refused."""
    options = run.options or {}
    given = form.model_dump(exclude_unset=True)
    wanted = {"pooling": options.get("pooling", "mean"), "layer": options.get("layer"), "checkpoint_id": None}
    defaults = EmbeddingForm().model_dump()
    wrong = [k for k, v in given.items() if k in wanted and v != wanted[k] and v != defaults[k]]
    if wrong:
        raise Unprocessable(
            f"neighbours embed the images the way embedding run {run.id} embedded the dataset "
            f"(pooling={wanted['pooling']}, layer={wanted['layer']}, the final encoder); leave out {', '.join(wrong)}",
            errors=[{"field": k, "message": "set by the embedding run"} for k in wrong])


def neighbours(*, sessions: sessionmaker[Session], dispatcher: Dispatcher, settings: Settings,
               artifacts: ArtifactStore, tenant: str, job_id: str, request: EmbeddingInput, k: int,
               run_id: str | None) -> dict[str, Any]:
    """For each uploaded image, the ``k`` most similar dataset images (cosine of embeddings)."""
    with sessions() as session:
        job = get_job(session=session, tenant=tenant, job_id=job_id)
        if job.status != JobStatus.SUCCEEDED:
            raise Conflict(f"job {job.id} is {job.status}; neighbours need a succeeded job")
        run = choose_run(session, job, run_id)
        session.expunge(run)
    _check_options(request.form, run)
    index = load_index(artifacts, run)
    options = run.options or {}
    payload: dict[str, Any] = {
        "job_id": job_id, "checkpoint_id": None, "pooling": options.get("pooling", "mean"),
        "layer": options.get("layer"), "normalize": True,
        "images_b64": [base64.b64encode(im.data).decode("ascii") for im in request.images],
    }
    answer = dispatcher.embed(payload, timeout=settings.embed_timeout_s)
    vectors = answer.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != len(request.images):
        raise BadGateway("the embedding worker returned the wrong number of vectors")
    queries = np.asarray(vectors, dtype=np.float32)
    if queries.shape[1] != index.vectors.shape[1]:
        raise Conflict(f"the encoder gives {queries.shape[1]}-d vectors but run {run.id} holds "
                       f"{index.vectors.shape[1]}-d ones; start a new embedding run")
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    queries = np.divide(queries, norms, out=np.zeros_like(queries), where=norms > 0)
    scores = queries @ index.vectors.T
    scores[:, ~index.valid] = -np.inf
    take = min(k, int(index.valid.sum()))
    base = f"/v1/jobs/{job_id}/dataset-images"
    data = []
    for i, (image, row) in enumerate(zip(request.images, scores, strict=True)):
        top = np.argpartition(-row, take - 1)[:take] if take else np.array([], dtype=np.int64)
        top = top[np.argsort(-row[top], kind="stable")]
        data.append({"index": i, "name": image.name, "neighbours": [
            {"index": int(j), "name": index.names[j], "score": round(float(row[j]), 6),
             "thumbnail_url": f"{base}/{int(j)}?run_id={run.id}"} for j in top]})
    return {"data": data, "k": k, "run_id": run.id, "dataset": run.dataset, "count": len(index.names)}


def _local(dataset: str) -> str | None:
    if "://" not in dataset:
        return dataset
    if dataset.startswith("file://"):
        return dataset.removeprefix("file://")
    return None


def _source(location: str, settings: Settings) -> tuple[Any, dict[str, int]]:
    """The dataset as the workers open it, and name -> position, cached per location."""
    from simmim.data.sources import open_source  # no torch: simmim.data imports lazily

    cached: tuple[Any, dict[str, int]] | None = _sources.get(location)
    if cached is not None:
        return cached
    source = open_source(location, max_member_bytes=settings.max_archive_member_bytes,
                         allowed_roots=settings.allowed_roots)
    value = (source, {source.name(i): i for i in range(len(source))})
    _sources.put(location, value)
    return value


def dataset_image(*, session: Session, artifacts: ArtifactStore, settings: Settings, tenant: str,
                  job_id: str, index: int, run_id: str | None, size: int) -> bytes:
    """Image ``index`` of the run's ``files.txt`` as a PNG at most ``size`` px on its long side."""
    from simmim.data.images import decode_image
    from simmim.errors import DataError, ImageDecodeError

    job = get_job(session=session, tenant=tenant, job_id=job_id)
    run = choose_run(session, job, run_id)
    run_index = load_index(artifacts, run)
    if not 0 <= index < len(run_index.names):
        raise NotFound(f"embedding run {run.id} has {len(run_index.names)} images; there is no image {index}")
    location = _local(run.dataset)
    if location is None:
        raise Conflict(f"{run.dataset} is a remote dataset; the API shows images of local datasets only")
    name = run_index.names[index]
    try:
        source, positions = _source(location, settings)
        position = positions.get(name)
        if position is None:  # the dataset changed since the run: list it again once
            _sources.put(location, None)
            source, positions = _source(location, settings)
            position = positions.get(name)
        if position is None:
            raise NotFound(f"{name} is no longer in {run.dataset}")
        image = decode_image(source.read_bytes(position), name, max_pixels=settings.max_image_pixels)
    except (DataError, ImageDecodeError) as err:
        raise NotFound(f"image {index} ({name}) cannot be read: {err}") from err
    image.thumbnail((size, size), Image.Resampling.BICUBIC if max(image.size) > size else Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
