"""``/v1/jobs/{id}/neighbours`` (uploaded images -> nearest dataset images) and ``/dataset-images/{i}``."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from api.deps import (
    ArtifactsDep,
    DispatcherDep,
    EmbedSlotsDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    TenantDep,
)
from api.embedding_input import EmbeddingInputDep
from api.errors import ResponsesDoc, problem_responses
from api.routes.embeddings import EMBED_BODY_DOC
from api.schemas.neighbours import NeighboursPublic
from api.services import neighbours

router = APIRouter(prefix="/v1/jobs", tags=["embeddings"])
RUN_ID = Annotated[str | None, Query(max_length=60, description="An embedding run of the job (default: the newest "
                                                                "succeeded run of the job's dataset)")]
PNG_DOC: ResponsesDoc = {200: {"description": "A PNG at most `size` px on its long side",
                               "content": {"image/png": {}}}}


@router.post("/{job_id}/neighbours", openapi_extra=EMBED_BODY_DOC,
             responses=problem_responses(401, 404, 409, 413, 415, 422, 502, 503, 504))
async def find_neighbours(job_id: str, tenant: TenantDep, body: EmbeddingInputDep, sessions: SessionsDep,
                          settings: SettingsDep, dispatcher: DispatcherDep, artifacts: ArtifactsDep,
                          slots: EmbedSlotsDep,
                          k: Annotated[int, Query(ge=1, le=100, description="Neighbours per image")] = 5,
                          run_id: RUN_ID = None) -> NeighboursPublic:
    """Embed the images (as the embedding run embedded the dataset) and return, for each, the ``k``
    most similar images of the job's dataset by cosine similarity.

    Needs a succeeded embedding run of the job's dataset; without one the answer is 409 (start one
    with ``POST /v1/jobs/{id}/embedding-runs``, then ask again)."""
    call = partial(neighbours.neighbours, sessions=sessions, dispatcher=dispatcher, settings=settings,
                   artifacts=artifacts, tenant=tenant, job_id=job_id, request=body, k=k, run_id=run_id)
    return NeighboursPublic.model_validate(await anyio.to_thread.run_sync(call, limiter=slots))


@router.get("/{job_id}/dataset-images/{index}", response_class=Response,
            responses={**PNG_DOC, **problem_responses(401, 404, 409, 422)})
def dataset_image(job_id: str, index: Annotated[int, Path(ge=0, le=2**31 - 1)], session: SessionDep,
                  tenant: TenantDep, settings: SettingsDep, artifacts: ArtifactsDep, run_id: RUN_ID = None,
                  size: Annotated[int, Query(ge=16, le=512, description="Longest side in pixels")] = 128,
                  ) -> Response:
    """Image ``index`` of an embedding run's ``files.txt``, read from the dataset and re-encoded small.

    Only images listed by that run are served, read as the workers read the dataset (local
    folders, list files and archives; not remote datasets)."""
    png = neighbours.dataset_image(session=session, artifacts=artifacts, settings=settings, tenant=tenant,
                                   job_id=job_id, index=index, run_id=run_id, size=size)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
