"""``POST /v1/jobs/{id}/neighbours``: the dataset images most similar to each uploaded image."""

from __future__ import annotations

from pydantic import BaseModel, Field


class NeighbourPublic(BaseModel):
    index: int = Field(description="Row of the embedding run's files.txt / embeddings.npy")
    name: str = Field(description="The dataset image's name (as in files.txt)")
    score: float = Field(description="Cosine similarity, -1 to 1")
    thumbnail_url: str = Field(description="GET it for a small PNG of the dataset image")


class ImageNeighboursPublic(BaseModel):
    index: int = Field(description="Position of the uploaded image in the request")
    name: str | None
    neighbours: list[NeighbourPublic] = Field(description="Most similar first")


class NeighboursPublic(BaseModel):
    """For each uploaded image, its ``k`` nearest dataset images by cosine similarity of embeddings."""

    data: list[ImageNeighboursPublic]
    k: int
    run_id: str = Field(description="The embedding run compared with")
    dataset: str
    count: int = Field(description="Images in the run")
