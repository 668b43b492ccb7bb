"""``/v1/jobs/{id}/previews`` (reconstruction grids per checkpoint) and ``/v1/jobs/{id}/plot.png``."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from api.deps import ArtifactsDep, SessionDep, TenantDep
from api.errors import ResponsesDoc, problem_responses
from api.plotting import MIN_PANEL
from api.schemas.previews import PreviewsPublic
from api.services import previews
from api.services.previews import PREVIEW_NAME

router = APIRouter(prefix="/v1/jobs", tags=["previews"])
PREVIEW_DOC: ResponsesDoc = {
    200: {"description": "The preview grid (ETag is its sha256)", "content": {"image/png": {}}},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
}
PLOT_DOC: ResponsesDoc = {200: {"description": "One panel per metric over steps", "content": {"image/png": {}}}}
PREVIEW_CACHE = "private, max-age=31536000, immutable"


@router.get("/{job_id}/previews", responses=problem_responses(401, 404, 422))
def list_previews(job_id: str, session: SessionDep, tenant: TenantDep, artifacts: ArtifactsDep) -> PreviewsPublic:
    """The reconstruction previews written at each checkpoint, oldest first (empty before the first).

    Each is a PNG grid with one row per image (the same images and masks at every checkpoint) and
    four columns: original, masked input (masked pixels grey), reconstruction, and the
    reconstruction pasted into the masked pixels of the original."""
    return previews.list_previews(session=session, artifacts=artifacts, tenant=tenant, job_id=job_id)


@router.get("/{job_id}/previews/{name}", response_class=Response,
            responses={**PREVIEW_DOC, **problem_responses(401, 404, 422)})
def preview(job_id: str, name: Annotated[str, Path(pattern=PREVIEW_NAME, description="e.g. step_00000010.png")],
            request: Request, session: SessionDep, tenant: TenantDep, artifacts: ArtifactsDep) -> Response:
    """One preview grid as PNG."""
    data = previews.preview_png(session=session, artifacts=artifacts, tenant=tenant, job_id=job_id, name=name)
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": PREVIEW_CACHE}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and any(t.strip().removeprefix("W/") in (etag, "*") for t in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/png",
                    headers={**headers, "Content-Disposition": f'inline; filename="{name}"'})


@router.get("/{job_id}/plot.png", response_class=Response, responses={**PLOT_DOC, **problem_responses(401, 404, 422)})
def plot(job_id: str, session: SessionDep, tenant: TenantDep,
         keys: Annotated[str, Query(max_length=500, description="Comma-separated metric keys, one panel each")]
         = "loss,lr,images_per_sec",
         width: Annotated[int, Query(ge=MIN_PANEL[0], le=3000, description="Pixels")] = 900,
         height: Annotated[int | None, Query(ge=MIN_PANEL[1], le=3000,
                                             description="Pixels; default 220 per metric")] = None) -> Response:
    """Loss, learning rate, throughput (or any reported metric) over steps, as PNG."""
    png = previews.plot_png(session=session, tenant=tenant, job_id=job_id, keys=keys, width=width, height=height)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})
