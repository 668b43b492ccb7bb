"""``/v1/jobs/{id}/checkpoints``: list checkpoints and stream their content."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import ArtifactsDep, SessionDep, TenantDep
from api.downloads import serve
from api.errors import ResponsesDoc, problem_responses
from api.schemas.checkpoints import CheckpointsPublic
from api.services import checkpoints

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])
BINARY_DOC: ResponsesDoc = {
    200: {"description": "The file (ETag is its sha256)", "content": {"application/octet-stream": {}}},
    206: {"description": "The requested byte range", "content": {"application/octet-stream": {}}},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
}


@router.get("/{job_id}/checkpoints", responses=problem_responses(401, 404, 422))
def list_checkpoints(job_id: str, session: SessionDep, tenant: TenantDep) -> CheckpointsPublic:
    """Every recorded checkpoint and exported encoder of the job, by step."""
    return checkpoints.list_checkpoints(session=session, tenant=tenant, job_id=job_id)


@router.get("/{job_id}/checkpoints/{checkpoint_id}/content", response_class=Response,
            responses={**BINARY_DOC, **problem_responses(401, 404, 410, 416, 422)})
def checkpoint_content(job_id: str, checkpoint_id: str, request: Request, session: SessionDep,
                       tenant: TenantDep, artifacts: ArtifactsDep) -> Response:
    """Stream a checkpoint; resumable with ``Range`` and verifiable with ``X-Checksum-SHA256``."""
    item = checkpoints.checkpoint_download(session=session, tenant=tenant, job_id=job_id,
                                           checkpoint_id=checkpoint_id)
    return serve(artifacts, item, request.headers)
