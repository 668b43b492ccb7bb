"""Reads the body of ``POST /v1/jobs/{id}/embeddings``: multipart files or JSON base64, checked.

A FastAPI dependency so that the route itself stays a short synchronous function.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import Depends, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import SettingsDep
from api.errors import (
    BadRequest,
    PayloadTooLarge,
    ProblemError,
    Unprocessable,
    UnsupportedMediaType,
    field_problems,
    validation_detail,
)
from api.images import (
    EmbeddingInput,
    ImageLimits,
    UploadedImage,
    check_counts,
    check_images,
    decode_base64,
)
from api.schemas.embeddings import EmbeddingForm, EmbeddingRequest

MULTIPART, JSON = "multipart/form-data", "application/json"


def _invalid(err: ValidationError) -> Unprocessable:
    problems = field_problems(list(err.errors()))
    return Unprocessable(validation_detail(problems), errors=problems)


async def _from_multipart(request: Request, limits: ImageLimits) -> EmbeddingInput:
    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=20)
    except ProblemError:
        raise
    except StarletteHTTPException as err:
        if "Too many files" in str(err.detail):
            raise PayloadTooLarge(f"more than {limits.max_images} images in one request") from err
        raise BadRequest(f"malformed multipart body: {err.detail}") from err
    try:
        parts = form.getlist("files")
        uploads = [u for u in parts if isinstance(u, UploadFile)]
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if k != "files"}
        if not uploads or len(uploads) != len(parts):
            raise Unprocessable("send the images as one or more 'files' file parts",
                                errors=[{"field": "files", "message": "at least one file part, and only file parts"}])
        check_counts(len(uploads), 0, limits)
        images = [UploadedImage(field=f"files[{i}]", name=u.filename, data=await u.read())
                  for i, u in enumerate(uploads)]
    finally:
        await form.close()
    try:
        options = EmbeddingForm.model_validate(fields)
    except ValidationError as err:
        raise _invalid(err) from err
    return EmbeddingInput(images=images, form=options)


def _decode_json(body: bytes, limits: ImageLimits) -> EmbeddingInput:
    try:
        req = EmbeddingRequest.model_validate_json(body)
    except ValidationError as err:
        raise _invalid(err) from err
    check_counts(len(req.images), 0, limits)
    if req.names is not None and len(req.names) != len(req.images):
        raise Unprocessable("names must have one entry per image",
                            errors=[{"field": "names", "message": f"{len(req.names)} names for {len(req.images)} images"}])
    names: list[str | None] = list(req.names) if req.names else [None] * len(req.images)
    images = [UploadedImage(field=f"images[{i}]", name=n, data=d)
              for i, (n, d) in enumerate(zip(names, decode_base64(req.images), strict=True))]
    return EmbeddingInput(images=images, form=EmbeddingForm.model_validate(req.model_dump(exclude={"images", "names"})))


async def read_embedding_input(request: Request, settings: SettingsDep) -> EmbeddingInput:
    """The request's images and options, or a 413/415/422 problem."""
    limits = ImageLimits(settings.max_embed_images, settings.max_embed_bytes, settings.max_image_pixels)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == MULTIPART:
        parsed = await _from_multipart(request, limits)
    elif content_type == JSON or content_type.endswith("+json"):
        parsed = await anyio.to_thread.run_sync(_decode_json, await request.body(), limits)
    else:
        raise UnsupportedMediaType(f"send {MULTIPART} (files) or {JSON} (base64 images), "
                                   f"not {content_type or 'no Content-Type'}")
    await anyio.to_thread.run_sync(check_images, parsed.images, limits)
    return parsed


EmbeddingInputDep = Annotated[EmbeddingInput, Depends(read_embedding_input)]
