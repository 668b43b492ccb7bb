"""``/v1/jobs/{id}/embeddings`` (a few images, answered now) and ``/embedding-runs`` (a dataset)."""

from __future__ import annotations

from functools import partial

import anyio
from fastapi import APIRouter, Request, Response, status

from api.deps import (
    ArtifactsDep,
    DispatcherDep,
    EmbedSlotsDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    TenantDep,
)
from api.downloads import serve
from api.embedding_input import EmbeddingInputDep
from api.errors import ResponsesDoc, problem_responses
from api.schemas.embeddings import EmbeddingRunCreate, EmbeddingRunPublic, EmbeddingsPublic
from api.services import embeddings

router = APIRouter(prefix="/v1/jobs", tags=["embeddings"])
EMBED_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/EmbeddingUpload"}},
}}}
FILE_DOC: ResponsesDoc = {
    200: {"description": "The file", "content": {"application/octet-stream": {}}},
    206: {"description": "The requested byte range", "content": {"application/octet-stream": {}}},
}
TEXT_FILE_DOC: ResponsesDoc = {
    200: {"description": "The file", "content": {"text/plain": {}}},
    206: {"description": "The requested byte range", "content": {"text/plain": {}}},
}


@router.post("/{job_id}/embeddings", openapi_extra=EMBED_BODY_DOC,
             responses=problem_responses(401, 404, 409, 413, 415, 422, 502, 503, 504))
async def embed_images(job_id: str, tenant: TenantDep, body: EmbeddingInputDep, sessions: SessionsDep,
                       settings: SettingsDep, dispatcher: DispatcherDep, slots: EmbedSlotsDep) -> EmbeddingsPublic:
    """Embed up to ``max_embed_images`` images with the job's encoder (or ``checkpoint_id``).

    Waiting for the worker happens in a thread from a pool of its own (``EMBED_CONCURRENCY``),
    so a burst of embedding requests cannot starve the other routes.
    """
    call = partial(embeddings.embed_images, sessions=sessions, dispatcher=dispatcher, settings=settings,
                   tenant=tenant, job_id=job_id, request=body)
    return await anyio.to_thread.run_sync(call, limiter=slots)


@router.post("/{job_id}/embedding-runs", status_code=status.HTTP_202_ACCEPTED,
             responses=problem_responses(401, 404, 409, 422, 503))
def create_embedding_run(job_id: str, body: EmbeddingRunCreate, response: Response, session: SessionDep,
                         tenant: TenantDep, settings: SettingsDep, dispatcher: DispatcherDep) -> EmbeddingRunPublic:
    """Queue the embedding of every image under ``dataset``; poll the run for its files."""
    run = embeddings.create_run(session=session, dispatcher=dispatcher, settings=settings, tenant=tenant,
                                job_id=job_id, body=body)
    response.headers["Location"] = f"/v1/jobs/{job_id}/embedding-runs/{run.id}"
    return EmbeddingRunPublic.from_record(run)


@router.get("/{job_id}/embedding-runs/{run_id}", responses=problem_responses(401, 404, 422))
def get_embedding_run(job_id: str, run_id: str, session: SessionDep, tenant: TenantDep) -> EmbeddingRunPublic:
    """Status, progress and, once succeeded, the links to the result files."""
    run = embeddings.get_run(session=session, tenant=tenant, job_id=job_id, run_id=run_id)
    return EmbeddingRunPublic.from_record(run)


@router.get("/{job_id}/embedding-runs/{run_id}/embeddings", response_class=Response,
            responses={**FILE_DOC, **problem_responses(401, 404, 409, 410, 416, 422)})
def embedding_run_vectors(job_id: str, run_id: str, request: Request, session: SessionDep, tenant: TenantDep,
                          artifacts: ArtifactsDep) -> Response:
    """The ``(count, dim)`` float32 ``.npy`` of a succeeded run."""
    item = embeddings.run_download(session=session, tenant=tenant, job_id=job_id, run_id=run_id,
                                   which="embeddings")
    return serve(artifacts, item, request.headers)


@router.get("/{job_id}/embedding-runs/{run_id}/files", response_class=Response,
            responses={**TEXT_FILE_DOC, **problem_responses(401, 404, 409, 410, 416, 422)})
def embedding_run_files(job_id: str, run_id: str, request: Request, session: SessionDep, tenant: TenantDep,
                        artifacts: ArtifactsDep) -> Response:
    """``files.txt``: the image name of every row of the ``.npy``, in order."""
    item = embeddings.run_download(session=session, tenant=tenant, job_id=job_id, run_id=run_id, which="files")
    return serve(artifacts, item, request.headers)
