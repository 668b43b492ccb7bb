"""Normalisation with statistics from visible positions only, for masked ConvNet pretraining.

SparK (Tian et al. 2023) and ConvNeXt V2 (Woo et al. 2023) encode a masked image with sparse
convolutions, so masked positions never enter a normalisation statistic and the mask pattern
survives every stage. This module does the same with dense ops: a ``VisibleMask`` holds the
visible-position mask of the batch being encoded, and the norm layers after the stem are
switched (by class, so parameters, buffers and state-dict keys stay exactly timm's) to take
their batch or group statistics over the visible positions only. Without an active mask, or
for BatchNorm in eval mode (running statistics), they are the unchanged timm layers.

Per-position norms (LayerNorm over channels, timm ``LayerNorm2d``) need no change. BatchNorm
(also timm ``BatchNormAct2d``) and GroupNorm (also ``GroupNormAct``/``GroupNorm1Act``) are
handled; any other norm (EvoNorm, FilterResponseNorm, GlobalResponseNorm, ...) is reported by
``unsupported_norms``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class VisibleMask:
    """The visible-position mask (1 = visible) of the batch being encoded, at any resolution."""

    def __init__(self) -> None:
        self._stem: torch.Tensor | None = None
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    @contextmanager
    def active(self, visible: torch.Tensor) -> Iterator[None]:
        """Make ``visible`` (B, 1, h, w), float at the stem's resolution, current inside the block."""
        self._stem, self._cache = visible, {}
        try:
            yield
        finally:
            self._stem, self._cache = None, {}

    def at(self, size: tuple[int, int] | torch.Size) -> torch.Tensor | None:
        """The mask resized to (H, W), (B, 1, H, W); None when no mask is active."""
        if self._stem is None:
            return None
        key = (int(size[0]), int(size[1]))
        if key not in self._cache:
            self._cache[key] = resize_visible(self._stem, key)
        return self._cache[key]


def resize_visible(visible: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, H, W); a cell is visible only if every stem cell it covers is.

    With mask blocks that are a multiple of the total stride, every cell of every stage lies
    inside one block, so this is exact (min, max or nearest pooling would all agree).
    """
    if tuple(visible.shape[-2:]) == size:
        return visible
    return -F.adaptive_max_pool2d(-visible, size)  # min pooling


def visible_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """BatchNorm of ``x`` (B, C, H, W) with mean/var over visible positions of the whole batch.

    Running statistics are updated from the same visible-only statistics (unbiased variance,
    as ``nn.BatchNorm2d`` does), so eval mode sees unmasked-image statistics.
    """
    xf, w = x.float(), visible.float()
    count = w.sum().clamp_min(1.0)  # visible positions in the batch
    xw = xf * w  # (B, C, H, W), masked positions 0
    mean = xw.sum(dim=(0, 2, 3)) / count  # (C,)
    var = ((xw * xf).sum(dim=(0, 2, 3)) / count - mean.square()).clamp_min(0.0)  # (C,) biased
    if bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            momentum = bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                    momentum = 1.0 / float(bn.num_batches_tracked)
            momentum = 0.1 if momentum is None else momentum
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * count / (count - 1.0).clamp_min(1.0)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    scale = torch.rsqrt(var + bn.eps)  # (C,)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean * scale if bn.bias is None else bn.bias.float() - mean * scale
    y = torch.addcmul(shift.view(1, -1, 1, 1), xf, scale.view(1, -1, 1, 1))  # one pass: x * scale + shift
    return y.to(x.dtype)


def visible_group_norm(gn: nn.GroupNorm, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """GroupNorm of ``x`` (B, C, H, W) with per-sample, per-group statistics over visible positions."""
    b, c, h, w = x.shape
    g = gn.num_groups
    xf = x.float().view(b, g, c // g, h, w)  # (B, G, C/G, H, W)
    vis = visible.float().view(b, 1, 1, h, w)  # (B, 1, 1, H, W)
    count = (vis.sum(dim=(2, 3, 4), keepdim=True) * (c // g)).clamp_min(1.0)  # (B, 1, 1, 1, 1)
    mean = (xf * vis).sum(dim=(2, 3, 4), keepdim=True) / count  # (B, G, 1, 1, 1)
    centered = xf - mean
    var = (centered.square() * vis).sum(dim=(2, 3, 4), keepdim=True) / count
    y = (centered * torch.rsqrt(var + gn.eps)).view(b, c, h, w)  # (B, C, H, W)
    if gn.weight is not None and gn.bias is not None:
        y = y * gn.weight.float().view(1, -1, 1, 1) + gn.bias.float().view(1, -1, 1, 1)
    return y.to(x.dtype)


def _act_after_norm(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """timm's ``*NormAct`` layers apply dropout then activation after the norm; plain norms do not."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if drop is not None:
        y = drop(y)
    return act(y) if act is not None else y


def _batch_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    visible = self.simmim_visible.at(x.shape[-2:])
    batch_stats = self.training or self.running_mean is None
    if visible is None or not batch_stats:
        return self.simmim_base.forward(self, x)
    return _act_after_norm(self, visible_batch_norm(self, x, visible))


def _group_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    visible = self.simmim_visible.at(x.shape[-2:])
    if visible is None:
        return self.simmim_base.forward(self, x)
    return _act_after_norm(self, visible_group_norm(self, x, visible))


_VARIANTS: dict[type, type] = {}


def _variant(base: type) -> type:
    """A subclass of ``base`` whose forward uses visible-only statistics (one per class)."""
    if base not in _VARIANTS:
        forward = _batch_norm_forward if issubclass(base, nn.BatchNorm2d) else _group_norm_forward
        _VARIANTS[base] = type(f"VisibleStats{base.__name__}", (base,), {"forward": forward, "simmim_base": base})
    return _VARIANTS[base]


def _per_position_norms() -> tuple[type, ...]:
    """Norms whose statistics are over channels at one position: masking cannot leak into them."""
    from timm import layers

    names = ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d",
             "SimpleNormFp32", "SimpleNorm2dFp32")
    return (nn.LayerNorm, nn.RMSNorm, *(getattr(layers, n) for n in names if hasattr(layers, n)))


def _is_per_position(module: nn.Module) -> bool:
    return isinstance(module, _per_position_norms())  # LayerNorm covers timm's LayerNorm2d and *Act


def unsupported_norms(modules: list[nn.Module]) -> list[str]:
    """Class names of norm layers in ``modules`` that have no visible-only version here."""
    found = set()
    for root in modules:
        for m in root.modules():
            name = type(m).__name__
            known = isinstance(m, nn.BatchNorm2d | nn.GroupNorm) or _is_per_position(m)
            own_params = next(m.parameters(recurse=False), None) is not None  # a norm, not a container
            if not known and "Norm" in name and own_params:
                found.add(name)
    return sorted(found)


def use_visible_statistics(modules: list[nn.Module], visible: VisibleMask) -> int:
    """Switch every BatchNorm2d / GroupNorm under ``modules`` to visible-only statistics.

    Returns how many layers were switched. Parameters, buffers and state-dict keys are unchanged.
    """
    switched = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm) and type(m) not in _VARIANTS.values():
                m.__class__ = _variant(type(m))
                object.__setattr__(m, "simmim_visible", visible)  # a plain attribute, not a submodule
                switched += 1
    return switched
