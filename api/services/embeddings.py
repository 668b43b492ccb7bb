"""Embeddings with a job's encoder: a few images now (through a worker), or a dataset as a run."""

from __future__ import annotations

import base64
from typing import Any, Literal

from sqlalchemy.orm import Session, sessionmaker

from api.dispatch import Dispatcher
from api.downloads import Download
from api.errors import (
    BadGateway,
    Conflict,
    NotFound,
    ServiceUnavailable,
    Unprocessable,
    validation_detail,
)
from api.images import EmbeddingInput
from api.schemas.embeddings import EmbeddingPublic, EmbeddingRunCreate, EmbeddingsPublic
from api.services.jobs import get_job
from jobstore import repo
from jobstore.models import EmbeddingRun, Job
from jobstore.states import JobStatus
from simmim_service.settings import Settings
from simmim_service.spec import check_dataset


def _require_succeeded(job: Job, what: str) -> None:
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"job {job.id} is {job.status}; {what} needs a succeeded job"
                       + (" or a checkpoint_id" if what == "embedding" else ""))


def embed_images(*, sessions: sessionmaker[Session], dispatcher: Dispatcher, settings: Settings, tenant: str,
                 job_id: str, request: EmbeddingInput) -> EmbeddingsPublic:
    """Ask an embed worker for one vector per image and wait for it (``embed_timeout_s``).

    The job checks use a short session of their own: no connection is held while a worker computes.
    """
    checkpoint_id = request.form.checkpoint_id
    with sessions() as session:
        job = get_job(session=session, tenant=tenant, job_id=job_id)
        if checkpoint_id is not None:
            if repo.get_checkpoint(session, job_id=job_id, checkpoint_id=checkpoint_id) is None:
                raise NotFound(f"job {job_id} has no checkpoint {checkpoint_id!r}")
        else:
            _require_succeeded(job, "embedding")
    payload: dict[str, Any] = {
        "job_id": job_id, "checkpoint_id": checkpoint_id, "pooling": request.form.pooling,
        "layer": request.form.layer, "normalize": request.form.normalize,
        "images_b64": [base64.b64encode(im.data).decode("ascii") for im in request.images],
    }
    answer = dispatcher.embed(payload, timeout=settings.embed_timeout_s)
    return _public(answer, request)


def _public(answer: dict[str, Any], request: EmbeddingInput) -> EmbeddingsPublic:
    vectors = answer.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != len(request.images):
        raise BadGateway(f"the embedding worker returned {len(vectors) if isinstance(vectors, list) else 'no'} "
                         f"vectors for {len(request.images)} images")
    data = [EmbeddingPublic(index=i, name=im.name, embedding=v)
            for i, (im, v) in enumerate(zip(request.images, vectors, strict=True))]
    return EmbeddingsPublic(data=data, dim=int(answer.get("dim", len(vectors[0]) if vectors else 0)),
                            model=str(answer.get("model", "")), checkpoint_id=answer.get("checkpoint_id"))


def create_run(*, session: Session, dispatcher: Dispatcher, settings: Settings, tenant: str,
               job_id: str, body: EmbeddingRunCreate) -> EmbeddingRun:
    """Commit a queued run over ``body.dataset``, then enqueue it (503 leaves it queued)."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    _require_succeeded(job, "an embedding run")
    problems = check_dataset(body.dataset, settings)
    if problems:
        raise Unprocessable(validation_detail(problems), errors=problems)
    run = repo.create_embedding_run(session, job_id=job_id, dataset=body.dataset,
                                    options=body.model_dump(include={"pooling", "layer", "normalize"}))
    session.commit()
    try:
        dispatcher.enqueue_embedding_run(job_id, run.id)
    except ServiceUnavailable as err:
        raise ServiceUnavailable(f"embedding run {run.id} was saved but could not be queued: {err.detail}",
                                 headers=err.headers, run_id=run.id) from err
    return run


def get_run(*, session: Session, tenant: str, job_id: str, run_id: str) -> EmbeddingRun:
    get_job(session=session, tenant=tenant, job_id=job_id)
    run = repo.get_embedding_run(session, job_id=job_id, run_id=run_id)
    if run is None:
        raise NotFound(f"job {job_id} has no embedding run {run_id!r}")
    return run


def run_download(*, session: Session, tenant: str, job_id: str, run_id: str,
                 which: Literal["embeddings", "files"]) -> Download:
    """The ``.npy`` or ``files.txt`` of a succeeded run."""
    run = get_run(session=session, tenant=tenant, job_id=job_id, run_id=run_id)
    key = run.embeddings_key if which == "embeddings" else run.files_key
    if run.status != JobStatus.SUCCEEDED or key is None:
        raise Conflict(f"embedding run {run_id} is {run.status}; its files exist once it has succeeded")
    if which == "embeddings":
        return Download(key=key, filename=f"{run_id}.npy")
    return Download(key=key, filename=f"{run_id}.files.txt", media_type="text/plain; charset=utf-8")
