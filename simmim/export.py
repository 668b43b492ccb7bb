"""Export the trained encoder as plain timm weights: ``encoder.safetensors`` + ``config.json``.

The export loads with no code of ours::

    cfg = json.load(open("config.json"))
    model = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))
    embedding = model(images)   # mean-pooled patch tokens (ConvNets: pooled final map), as served
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file, save
from torch import nn

from simmim.atomic import atomic_write_bytes, atomic_write_json, sha256_file
from simmim.backbones import CONVNET_FAMILIES, family_of
from simmim.checkpoint import CheckpointInfo, CheckpointManager
from simmim.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig
from simmim.errors import CheckpointError
from simmim.model import SimMIM, encoder_kwargs

WEIGHTS = "encoder.safetensors"
CONFIG = "config.json"


def export_encoder(model: SimMIM, cfg: TrainConfig, directory: str | Path) -> Path:
    """Write the encoder's weights and loading recipe into ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.model.state_dict().items()}
    digest = atomic_write_bytes(out / WEIGHTS, save(state, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG, export_config(cfg, digest))
    return out


def export_config(cfg: TrainConfig, weights_sha256: str) -> dict[str, Any]:
    """The JSON recipe that rebuilds the encoder in plain timm."""
    return {
        "format": "simmim-encoder/1",
        "timm_name": cfg.model.name,
        "timm_kwargs": encoder_kwargs(cfg.model),
        "image_size": cfg.model.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "pooling": "mean",
        "pooling_note": _pooling_note(cfg.model.name),
        "weights": WEIGHTS,
        "weights_sha256": weights_sha256,
        "experiment": cfg.experiment_name,
    }


def _pooling_note(name: str) -> str:
    if family_of(name) in CONVNET_FAMILIES:
        return "model(x) returns the final feature map averaged over positions (global average pooling)"
    return "model(x) returns the final-norm patch tokens averaged (no class token)"


def load_exported(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported encoder (plain timm model, eval mode) and its config."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d} is not an exported encoder (needs {CONFIG} and {WEIGHTS})")
    config = json.loads((d / CONFIG).read_text())
    if sha256_file(d / WEIGHTS) != config.get("weights_sha256"):
        raise CheckpointError(f"{d / WEIGHTS} does not match the sha256 in {CONFIG}; re-export it")
    model = timm.create_model(config["timm_name"], pretrained=False, **config["timm_kwargs"])
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    return model.eval(), config


def find_checkpoint(path: str | Path) -> tuple[CheckpointManager, CheckpointInfo]:
    """The checkpoint named by ``path``: a checkpoint file, a checkpoints directory or a run
    directory (then the newest valid checkpoint); raises CheckpointError when there is none."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    manager = CheckpointManager(p if p.is_dir() else p.parent)
    info = manager.latest_valid() if p.is_dir() else next((c for c in manager.list() if c.path == p), None)
    if info is None:
        raise CheckpointError(f"{path}: no valid checkpoint found")
    return manager, info


def encoder_from_checkpoint(state: dict[str, Any]) -> tuple[SimMIM, TrainConfig]:
    """Rebuild the SimMIM model and its config from a training checkpoint's state."""
    from simmim.model import build_model

    cfg = TrainConfig.model_validate(state["config"])
    model_cfg = cfg.model.model_copy(update={"init_checkpoint": None})
    model = build_model(model_cfg)
    model.load_state_dict(state["model"])
    return model.eval(), cfg

