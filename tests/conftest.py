"""Shared fixtures: real images (scikit-learn's digits written as PNG files) and tiny configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simmim.config import TrainConfig
from simmim.sample_data import write_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first 400 digits as 32 px PNGs: ``{"train": ..., "test": ...}`` ImageFolder trees."""
    return write_digits(tmp_path_factory.mktemp("digits"), size=32, limit=400)


def tiny_config(source: Path, output_dir: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A 2-block, 48-wide ViT with 4 px patches on 32 px images: seconds per run on a CPU."""
    raw: dict[str, Any] = {
        "data": {"source": str(source), "num_workers": 0},
        "model": {"name": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4,
                  "mask_patch_size": 8, "model_kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 3}},
        "optim": {"batch_size": 16, "base_lr": 5e-2, "max_steps": 12, "warmup_steps": 2},
        "run": {"output_dir": str(output_dir), "checkpoint_every": 4, "keep_last": 2, "log_every": 1},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return TrainConfig.model_validate(raw)
