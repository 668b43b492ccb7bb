"""timm encoders split at the point where SimMIM substitutes mask tokens.

SimMIM replaces masked patch embeddings with a learnable token right after patch embedding,
before position embeddings and blocks. timm's ``forward_features`` runs both halves in one
call, so each adapter exposes them separately, composing timm's own submodules (no model
code is copied): ``embed`` gives the patch tokens, ``encode`` runs the rest and returns a
feature map (B, C, h, w). For ConvNets (ResNet, ResNetV2, ConvNeXt) the stem plays patch
embedding: its stride-4 output positions are the tokens.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva
from timm.models.resnet import ResNet
from timm.models.resnetv2 import ResNetV2
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from simmim.errors import ConfigError
from simmim.pos_embed import sincos_2d_pos_embed
from simmim.visible_norm import VisibleMask, unsupported_norms, use_visible_statistics

SUPPORTED_FAMILIES = "vit_*, deit_*, deit3_*, eva*, swin_*, swinv2_*, resnet*, resnetv2_* and convnext_*"
CONVNET_FAMILIES = ("resnet", "resnetv2", "convnext")


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

    def encode_masked(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``encode`` for tokens whose masked positions (``mask`` (B, h, w), 1 = masked) hold the
        mask token. Transformers need nothing more; ConvNets may re-apply the mask per stage."""
        return self.encode(tokens)

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


class ConvNetAdapter(EncoderAdapter):
    """timm ConvNets: the stem plays patch embedding, its output positions are the tokens.

    ``embed`` returns the stem output channels-last, (B, h, w, C) with h = H / stem stride (4),
    so the mask token replaces whole stem positions exactly as it replaces Swin patch tokens.
    With ``remask`` (``model.convnet_remask``), ``encode_masked`` zeroes the masked positions
    after every stage but the last (the mask resized to that stage's resolution) and every
    BatchNorm/GroupNorm after the stem takes its statistics from visible positions only
    (``simmim.visible_norm``), so the mask pattern does not wash out as it would in dense
    convolutions. The last stage is left dense: the linear decoder predicts masked pixels
    from the final map, so masked cells there must carry what the last stage inferred.
    """

    def __init__(self, model: nn.Module, remask: bool) -> None:
        stages = self._stage_modules(model)
        info = list(model.feature_info)  # type: ignore[arg-type]
        first, last = info[-len(stages)], info[-1]
        super().__init__(model, int(info[0]["num_chs"]), int(first["reduction"]), int(last["reduction"]))
        self.remask = remask
        self.visible = VisibleMask()
        if remask:
            after_stem = [*stages, self._final_norm_module()]
            bad = unsupported_norms(after_stem)
            if bad:
                raise ConfigError([f"model.convnet_remask: {type(model).__name__} uses {', '.join(bad)}, which "
                                   "has no visible-only statistics here; set model.convnet_remask=false"])
            use_visible_statistics(after_stem, self.visible)

    @staticmethod
    def _stage_modules(model: Any) -> list[nn.Module]:
        return list(model.stages)

    @property
    def stages(self) -> list[nn.Module]:
        """The feature stages after the stem, in order."""
        return self._stage_modules(self.model)

    def _final_norm_module(self) -> nn.Module:
        return nn.Identity()

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """The stem: (B, 3, H, W) -> (B, C, H/4, W/4)."""
        return self.model.stem(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem(images).permute(0, 2, 3, 1)  # (B, h, w, C)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.permute(0, 3, 1, 2)  # (B, C, h, w)
        for stage in self.stages:
            x = stage(x)
        return self._final_norm_module()(x)  # (B, C', h/8, w/8)

    def encode_masked(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.remask:
            return self.encode(tokens)
        x = tokens.permute(0, 3, 1, 2)  # (B, C, h, w)
        visible = 1.0 - mask.to(torch.float32).unsqueeze(1)  # (B, 1, h, w), 1 = visible
        stages = self.stages
        with self.visible.active(visible):
            for i, stage in enumerate(stages):
                x = stage(x)
                if i < len(stages) - 1:
                    cells = self.visible.at(x.shape[-2:])  # (B, 1, h_i, w_i)
                    assert cells is not None
                    x = x * cells.to(x.dtype)  # masked cells -> 0
            return self._final_norm_module()(x)  # (B, C', h/8, w/8)


class ResNetAdapter(ConvNetAdapter):
    """timm ``ResNet`` (resnet*): stem = conv1, bn1, act1, maxpool; stages = layer1..layer4."""

    @staticmethod
    def _stage_modules(model: Any) -> list[nn.Module]:
        return [model.layer1, model.layer2, model.layer3, model.layer4]

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(images))))  # (B, C, H/4, W/4)


class ResNetV2Adapter(ConvNetAdapter):
    """timm ``ResNetV2`` (resnetv2_*): pre-activation stages, then the final norm."""

    def _final_norm_module(self) -> nn.Module:
        return self.model.norm


class ConvNeXtAdapter(ConvNetAdapter):
    """timm ``ConvNeXt`` (convnext_*) built with ``head_norm_first=True``: the final LayerNorm2d
    (``norm_pre``) normalises the feature map, as Swin's final norm does before the decoder."""

    def _final_norm_module(self) -> nn.Module:
        return self.model.norm_pre


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError([f"model.name: unknown timm model {name!r}{hint} (supported: {SUPPORTED_FAMILIES})"])


def family_of(name: str) -> str:
    """'vit', 'eva', 'swin', 'resnet', 'resnetv2' or 'convnext' for a supported timm model name;
    ConfigError otherwise."""
    _check_name(name)
    if name.startswith("resnetv2_"):
        return "resnetv2"
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("convnext_"):
        return "convnext"
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
    ConvNets take no image size (any multiple of the stride works); ConvNeXt is built with
    ``head_norm_first=True`` so its final LayerNorm2d normalises the map before pooling.
    """
    family = family_of(name)
    if family in CONVNET_FAMILIES:
        return _convnet_kwargs(name, family, patch_size, window_size, drop_path_rate, extra)
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


def _convnet_kwargs(name: str, family: str, patch_size: int | None, window_size: int | None,
                    drop_path_rate: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    problems = []
    if patch_size is not None:
        problems.append(f"model.patch_size: {name} is a ConvNet and has no patch size (its stem has stride 4, "
                        "its total stride is 32); leave it unset")
    if window_size is not None:
        problems.append("model.window_size only applies to Swin models")
    if problems:
        raise ConfigError(problems)
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": "avg"}
    if family == "convnext":
        kwargs["head_norm_first"] = True
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    kwargs.update(extra or {})
    return kwargs


def create_encoder(name: str, *, init: str = "mae", pos_embed: str = "sincos", convnet_remask: bool = False,
                   **kwargs: Any) -> EncoderAdapter:
    """Build a timm model from ``timm_kwargs`` output and wrap it for SimMIM.

    Args:
        name: timm model name.
        init: ``"mae"`` re-initialises ViTs as MAE does (xavier-uniform linears, patch
            projection treated as a linear layer); ``"timm"`` keeps timm's init.
        pos_embed: ``"sincos"`` freezes the ViT position table to 2-D sin-cos values.
        convnet_remask: ConvNets only: re-apply the mask after every stage with visible-only
            norm statistics (see ``ConvNetAdapter``). ConvNets keep timm's own initialisation.
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
    if isinstance(model, ResNet):
        return ResNetAdapter(model, convnet_remask)
    if isinstance(model, ResNetV2):
        return ResNetV2Adapter(model, convnet_remask)
    if isinstance(model, ConvNeXt):
        return ConvNeXtAdapter(model, convnet_remask)
    raise ConfigError([f"model.name: {name!r} is not supported for SimMIM (supported: {SUPPORTED_FAMILIES})"])


def stage_indices(model: Any) -> list[int]:
    """The ``forward_intermediates`` index of each block (ViT, EVA) or stage (Swin, ConvNets).

    ResNet and ResNetV2 count the stem as intermediate 0, so their stages are 1..4;
    ConvNeXt and Swin count stages from 0.
    """
    if getattr(model, "blocks", None) is not None:
        return list(range(len(model.blocks)))
    if isinstance(model, ResNet):
        return [1, 2, 3, 4]
    if isinstance(model, ResNetV2):
        return list(range(1, len(model.stages) + 1))
    if isinstance(model, ConvNeXt):
        return list(range(len(model.stages)))
    return list(range(len(model.layers)))


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
