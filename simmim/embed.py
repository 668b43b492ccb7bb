"""Embeddings from a trained encoder.

Default: mean-pooled final patch tokens (SimMIM's loss never trains the class token); for
ConvNets the global-average-pooled final feature map. Also available: the class token (ViTs),
or any intermediate block (ViT) or stage (Swin, ConvNets) mean-pooled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from simmim.backbones import stage_indices
from simmim.data import EvalTransform, ImageListDataset, ImageSource
from simmim.errors import ConfigError
from simmim.export import encoder_from_checkpoint, export_config, find_checkpoint, load_exported
from simmim.runtime import resolve_amp, resolve_device

Pooling = Literal["mean", "cls"]


@dataclass
class EmbeddingResult:
    """Embeddings of a whole source, in source order; failed images get a zero row."""

    embeddings: np.ndarray
    names: list[str]
    failed: list[str] = field(default_factory=list)


class Embedder:
    """A plain timm encoder plus its preprocessing, ready for batched inference."""

    def __init__(self, model: nn.Module, config: dict[str, Any], device: str = "auto",
                 precision: str = "fp32") -> None:
        self.device = resolve_device(device)
        self.amp = resolve_amp(precision, self.device)
        self.model: Any = model.to(self.device).eval()
        self.config = config
        self.transform = EvalTransform(config["image_size"], tuple(config["mean"]), tuple(config["std"]))

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Embedder:
        """From an exported encoder directory, a run directory, or a checkpoint file."""
        p = Path(path)
        if (p / "config.json").is_file() and (p / "encoder.safetensors").is_file():
            model, config = load_exported(p)
            return cls(model, config, **kwargs)
        if (p / "encoder").is_dir():
            return cls.load(p / "encoder", **kwargs)
        manager, info = find_checkpoint(p)
        simmim, cfg = encoder_from_checkpoint(manager.load(info))
        return cls(simmim.encoder.model, export_config(cfg, weights_sha256=""), **kwargs)

    @torch.no_grad()
    def embed_tensors(self, images: torch.Tensor, pooling: Pooling = "mean", layer: int | None = None,
                      normalize: bool = False) -> torch.Tensor:
        """Embeddings (B, D) of preprocessed images (B, 3, S, S), as fp32 on the CPU."""
        x = images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            if layer is not None:
                out = self._layer_features(x, layer).mean(dim=(2, 3))  # (B, C)
            elif pooling == "cls":
                out = self._cls(x)
            elif pooling == "mean":
                out = self.model(x)  # global_pool='avg' over patch tokens / positions, see simmim.backbones
            else:
                raise ConfigError([f"pooling: {pooling!r} is not one of mean, cls"])
        out = out.float()
        if normalize:
            out = F.normalize(out, dim=-1)
        return out.cpu()

    def _cls(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "cls_token", None) is None:
            raise ConfigError([f"pooling=cls: {self.config['timm_name']} has no class token; use mean"])
        return self.model.forward_features(x)[:, 0]  # (B, D)

    def _layer_features(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        indices = stage_indices(self.model)
        depth = len(indices)
        if not -depth <= layer < depth:
            raise ConfigError([f"layer: {layer} is out of range for {self.config['timm_name']} "
                               f"(it has {depth} blocks/stages: 0..{depth - 1}, or negative from the end)"])
        (feat,) = self.model.forward_intermediates(x, indices=[indices[layer]], intermediates_only=True)
        return feat  # (B, C, h, w)

    @property
    def num_layers(self) -> int:
        """Blocks (ViT) or stages (Swin, ConvNets) addressable with ``layer``."""
        return len(stage_indices(self.model))

    def embed_source(self, source: ImageSource, batch_size: int = 64, num_workers: int = 0,
                     pooling: Pooling = "mean", layer: int | None = None, normalize: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> EmbeddingResult:
        """Embed every image of ``source`` in order; unreadable images are listed in ``failed``."""
        dataset = ImageListDataset(source, self.transform)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
        chunks, failed, done = [], [], 0
        for batch in loader:
            vectors = self.embed_tensors(batch["image"], pooling, layer, normalize)
            vectors[~batch["ok"].bool()] = 0.0  # unreadable images: zero rows, listed in failed
            chunks.append(vectors.numpy())
            failed += [source.name(int(i)) for i, ok in zip(batch["index"], batch["ok"], strict=True) if not ok]
            done += len(batch["index"])
            if progress is not None:
                progress(done, len(source))
        names = [source.name(i) for i in range(len(source))]
        return EmbeddingResult(np.concatenate(chunks).astype(np.float32), names, failed)


def save_embeddings(result: EmbeddingResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``embeddings.npy`` and ``files.txt`` (one name per row, same order)."""
    from simmim.atomic import atomic_write_bytes, atomic_write_with

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / "embeddings.npy", lambda f: np.save(f, result.embeddings))
    atomic_write_bytes(out / "files.txt", "".join(n + "\n" for n in result.names).encode())
    return out / "embeddings.npy", out / "files.txt"
