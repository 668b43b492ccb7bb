"""Embedding bodies: synchronous requests (a few images) and asynchronous runs (a dataset)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobstore.models import EmbeddingRun

Pooling = Literal["mean", "cls"]


class EmbeddingOptions(BaseModel):
    """How to turn an image into a vector (SimMIM default: mean of the final patch tokens)."""

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling = Field(default="mean", description="'mean' of patch tokens, or 'cls' (ViTs)")
    layer: int | None = Field(default=None, ge=-64, le=63,
                              description="Mean-pool this block/stage instead (negative counts from the end)")
    normalize: bool = Field(default=False, description="L2-normalise every vector")


class EmbeddingForm(EmbeddingOptions):
    """The non-file fields of a multipart embedding request."""

    checkpoint_id: str | None = Field(default=None, max_length=60,
                                      description="Use this checkpoint instead of the final encoder")


class EmbeddingRequest(EmbeddingForm):
    """``POST /v1/jobs/{id}/embeddings`` as JSON (multipart takes ``files`` plus the same fields)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"images": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="],
         "pooling": "mean", "normalize": True}]})

    images: list[str] = Field(min_length=1, description="Base64-encoded image files (PNG, JPEG, WebP, ...)")
    names: list[str] | None = Field(default=None, description="Optional names, echoed back per image")


class EmbeddingPublic(BaseModel):
    index: int
    name: str | None
    embedding: list[float]


class EmbeddingsPublic(BaseModel):
    """One vector per image, in request order."""

    data: list[EmbeddingPublic]
    dim: int
    model: str
    checkpoint_id: str | None


class EmbeddingRunCreate(EmbeddingOptions):
    """``POST /v1/jobs/{id}/embedding-runs``: embed every image of a dataset location."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset": "/data/digits/test", "pooling": "mean", "normalize": True}]})

    dataset: str = Field(min_length=1, max_length=2000, description="Same forms as a job's dataset")


class EmbeddingRunPublic(BaseModel):
    """An asynchronous embedding run; the result files appear when it has succeeded."""

    id: str = Field(examples=["emb_01jq3v5n6xa7k2m9p4r8t0w3yz"])
    job_id: str
    dataset: str
    options: EmbeddingOptions
    status: str = Field(description="queued, running, succeeded, failed")
    progress: dict[str, Any]
    count: int | None = Field(description="Images embedded")
    failed: list[str] = Field(description="Images that could not be read (zero rows in the output)")
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    embeddings_url: str | None = Field(description="The (count, dim) float32 .npy, once succeeded")
    files_url: str | None = Field(description="files.txt: one image name per row of the .npy, once succeeded")

    @classmethod
    def from_record(cls, run: EmbeddingRun) -> EmbeddingRunPublic:
        base = f"/v1/jobs/{run.job_id}/embedding-runs/{run.id}"
        done = run.status == "succeeded"
        return cls(id=run.id, job_id=run.job_id, dataset=run.dataset,
                   options=EmbeddingOptions.model_validate(run.options or {}), status=run.status,
                   progress=run.progress or {}, count=run.count, failed=run.failed or [],
                   error=run.error_message, created_at=run.created_at, finished_at=run.finished_at,
                   embeddings_url=f"{base}/embeddings" if done and run.embeddings_key else None,
                   files_url=f"{base}/files" if done and run.files_key else None)
