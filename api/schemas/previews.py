"""Reconstruction previews of a job: one PNG grid per checkpoint."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PreviewPublic(BaseModel):
    """One preview grid: rows are images; columns are original | masked input | reconstruction |
    reconstruction pasted into the visible pixels."""

    name: str = Field(examples=["step_00000010.png"], description="File name, `step_` + 8-digit step + `.png`")
    step: int = Field(description="The checkpoint's optimiser step")
    width: int = Field(description="Pixels")
    height: int = Field(description="Pixels")
    url: str = Field(description="Path of the PNG", examples=["/v1/jobs/job_01jq3v5n6x0000000000/previews/"
                                                              "step_00000010.png"])


class PreviewsPublic(BaseModel):
    """Every preview of a job, oldest first (empty before the first checkpoint)."""

    data: list[PreviewPublic]
