"""timm encoders split at the point where SimMIM substitutes mask tokens.

SimMIM replaces masked patch embeddings with a learnable token right after patch embedding,
before position embeddings and blocks. timm's ``forward_features`` runs both halves in one
call, so each adapter exposes them separately, composing timm's own submodules (no model
code is copied): ``embed`` gives the patch tokens, ``encode`` runs the rest and returns a
feature map (B, C, h, w).
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from simmim.errors import ConfigError
from simmim.pos_embed import sincos_2d_pos_embed

SUPPORTED_FAMILIES = "vit_*, deit_*, deit3_*, eva*, swin_* and swinv2_*"


class EncoderAdapter(nn.Module):
    """A timm model plus the two halves of its feature forward.

    Attributes:
        model: The plain timm model (exported as-is).
        embed_dim: Channels of a patch token (the mask token's size).
        num_features: Channels of the final feature map.
        patch_size: Pixels per token side at patch embedding.
        stride: Total stride of the final feature map (the decoder's upsampling factor).
    """

    model: Any  # a timm model; its submodules are reached by name, so keep it untyped

    def __init__(self, model: nn.Module, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.model = model
        self.embed_dim = embed_dim
        self.num_features = int(self.model.num_features)
        self.patch_size = patch_size
        self.stride = stride

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens, (B, L, D) for ViTs or (B, h, w, D) for Swin."""
        return self.model.patch_embed(images)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Everything after patch embedding; returns the final feature map (B, C, h, w)."""
        raise NotImplementedError

    def cls_token_output(self, images: torch.Tensor) -> torch.Tensor:
        """The final class-token feature (B, C); only ViT-family models have one."""
        raise ConfigError([f"{type(self.model).__name__} has no class token; use pooling='mean'"])

    def _grid(self, num_tokens: int) -> int:
        side = int(num_tokens**0.5)
        if side * side != num_tokens:
            raise ValueError(f"expected a square token grid, got {num_tokens} tokens")
        return side


class ViTAdapter(EncoderAdapter):
    """timm ``VisionTransformer`` (vit_*, deit_*, deit3_*)."""

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m._pos_embed(tokens)  # (B, P+L, D), prefix tokens first
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        x = m.blocks(x)
        x = m.norm(x)
        return self._to_map(x[:, m.num_prefix_tokens :])

    def _to_map(self, x: torch.Tensor) -> torch.Tensor:
        side = self._grid(x.shape[1])
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # (B, D, h, w)

    def cls_token_output(self, images: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "cls_token", None) is None:
            return super().cls_token_output(images)
        return self.model.forward_features(images)[:, 0]  # (B, D)


class EvaAdapter(ViTAdapter):
    """timm ``Eva`` (eva02_*, eva_*): rotary position embeddings passed to every block."""

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if getattr(m, "rope_mixed", False):
            raise ConfigError(["EVA models with mixed RoPE are not supported for SimMIM"])
        x, rope = m._pos_embed(tokens)  # (B, P+L, D)
        x = m.norm_pre(x)
        for block in m.blocks:
            x = block(x, rope=rope)
        x = m.norm(x)
        return self._to_map(x[:, m.num_prefix_tokens :])


class SwinAdapter(EncoderAdapter):
    """timm ``SwinTransformer`` / ``SwinTransformerV2``: tokens stay (B, h, w, D)."""

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.model.layers(tokens)  # (B, h/8, w/8, C)
        x = self.model.norm(x)
        return x.permute(0, 3, 1, 2)  # (B, C, h/8, w/8)


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError([f"model.name: unknown timm model {name!r}{hint} (supported: {SUPPORTED_FAMILIES})"])


def family_of(name: str) -> str:
    """'vit', 'eva' or 'swin' for a supported timm model name; ConfigError otherwise."""
    _check_name(name)
    if name.startswith("swin"):
        return "swin"
    if name.startswith("eva"):
        return "eva"
    if name.startswith(("vit_", "deit")):
        return "vit"
    raise ConfigError([f"model.name: {name!r} is not supported for SimMIM (supported: {SUPPORTED_FAMILIES})"])


def timm_kwargs(
    name: str,
    image_size: int,
    patch_size: int | None = None,
    window_size: int | None = None,
    drop_path_rate: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` that build the encoder we train.

    ViTs get ``global_pool='avg'`` without fc_norm, so a plain timm model called on an
    image returns the mean-pooled, normed patch tokens: the same embedding we serve.
    """
    family = family_of(name)
    kwargs: dict[str, Any] = {"num_classes": 0, "img_size": image_size, "global_pool": "avg"}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if family == "vit":
        kwargs["fc_norm"] = False
    if family == "eva":
        kwargs["use_fc_norm"] = False
    if patch_size is not None:
        if family == "swin":
            raise ConfigError(["model.patch_size: Swin models keep their 4 px patches; leave it unset"])
        kwargs["patch_size"] = patch_size
    if family == "swin":
        kwargs["window_size"] = window_size or max(1, image_size // 32)
    elif window_size is not None:
        raise ConfigError(["model.window_size only applies to Swin models"])
    kwargs.update(extra or {})
    return kwargs


def create_encoder(name: str, *, init: str = "mae", pos_embed: str = "sincos", **kwargs: Any) -> EncoderAdapter:
    """Build a timm model from ``timm_kwargs`` output and wrap it for SimMIM.

    Args:
        name: timm model name.
        init: ``"mae"`` re-initialises ViTs as MAE does (xavier-uniform linears, patch
            projection treated as a linear layer); ``"timm"`` keeps timm's init.
        pos_embed: ``"sincos"`` freezes the ViT position table to 2-D sin-cos values.
        **kwargs: Passed to ``timm.create_model``.
    """
    try:
        model: Any = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError([f"timm could not build {name!r} with {kwargs}: {err}"]) from None
    if isinstance(model, SwinTransformer | SwinTransformerV2):
        swin: Any = model  # timm's Swin attributes are untyped
        stride = int(swin.feature_info[-1]["reduction"])
        return SwinAdapter(swin, swin.embed_dim, swin.patch_embed.patch_size[0], stride)
    if isinstance(model, VisionTransformer | Eva):
        if pos_embed == "sincos" and model.pos_embed is not None:
            _freeze_sincos(model)
        if init == "mae":
            _init_mae(model)
        patch = model.patch_embed.patch_size[0]
        cls = EvaAdapter if isinstance(model, Eva) else ViTAdapter
        return cls(model, model.embed_dim, patch, patch)
    raise ConfigError([f"model.name: {name!r} is not supported for SimMIM (supported: {SUPPORTED_FAMILIES})"])


def _freeze_sincos(model: Any) -> None:
    pos = model.pos_embed  # (1, P+L, D) or (1, L, D)
    grid = model.patch_embed.grid_size[0]
    table = sincos_2d_pos_embed(pos.shape[-1], grid)  # (L, D)
    with torch.no_grad():
        pos.zero_()
        pos[0, pos.shape[1] - grid * grid :] = table
    pos.requires_grad_(False)


def _init_mae(model: Any) -> None:
    """MAE initialisation: xavier-uniform linears, zero biases, unit norms, 0.02 tokens."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    proj = model.patch_embed.proj.weight  # (D, 3, p, p), initialised like a (D, 3*p*p) linear
    nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    for token in ("cls_token", "reg_token"):
        if getattr(model, token, None) is not None:
            nn.init.normal_(getattr(model, token), std=0.02)
