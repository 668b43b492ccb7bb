"""The SimMIM model: a timm encoder, a learnable mask token and a one-layer decoder.

Follows Xie et al. 2021 and microsoft/SimMIM: masked patch embeddings (for ConvNets, stem
output positions) are replaced by the mask token before position embeddings and blocks
(pixels are never zeroed); the decoder is
a 1x1 convolution to ``stride**2 * 3`` channels plus PixelShuffle(stride); the loss is L1 on
masked pixels of the normalised input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from simmim.backbones import ConvNetAdapter, EncoderAdapter, create_encoder, timm_kwargs
from simmim.config import ModelConfig
from simmim.errors import CheckpointError
from simmim.loss import masked_l1_loss
from simmim.masking import MaskGenerator

NO_DECAY_NAMES = ("mask_token", "pos_embed", "cls_token", "reg_token", "dist_token",
                  "relative_position_bias_table", "absolute_pos_embed")


class SimMIM(nn.Module):
    """SimMIM over an ``EncoderAdapter``; ``forward`` returns (loss, reconstruction)."""

    def __init__(self, encoder: EncoderAdapter, in_chans: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        stride = encoder.stride
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    def mask_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace masked patch embeddings with the mask token.

        Args:
            tokens: (B, L, D) or (B, h, w, D) patch embeddings.
            mask: (B, h, w) token-grid mask, 1 = masked.
        """
        w = mask.reshape(tokens.shape[:-1]).unsqueeze(-1).to(tokens.dtype)  # (B, ..., 1)
        return tokens * (1.0 - w) + self.mask_token.to(tokens.dtype) * w

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and reconstruction (B, 3, H, W) for normalised images (B, 3, H, W)."""
        tokens = self.encoder.embed(images)
        tokens = self.mask_tokens(tokens, mask)
        features = self.encoder.encode_masked(tokens, mask)  # (B, C, H/s, W/s)
        reconstruction = self.decoder(features)  # (B, 3, H, W)
        loss = masked_l1_loss(reconstruction, images, mask, self.encoder.patch_size)
        return loss, reconstruction

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay on biases, norms, position tables, tokens and the mask token."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_NAMES):
                no_decay.append(param)
            else:
                decay.append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def encoder_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs for the encoder described by ``cfg``."""
    return timm_kwargs(cfg.name, cfg.image_size, cfg.patch_size, cfg.window_size,
                       cfg.drop_path_rate, cfg.model_kwargs)


def build_model(cfg: ModelConfig) -> SimMIM:
    """Build SimMIM for ``cfg``; checks that the mask geometry fits the encoder."""
    encoder = create_encoder(cfg.name, pos_embed=cfg.pos_embed, convnet_remask=cfg.convnet_remask,
                             **encoder_kwargs(cfg))
    build_mask_generator(cfg, encoder)
    if cfg.init_checkpoint:
        load_encoder_weights(encoder.model, cfg.init_checkpoint)
    return SimMIM(encoder)


def build_mask_generator(cfg: ModelConfig, encoder: EncoderAdapter) -> MaskGenerator:
    """The mask generator matching ``cfg`` and the encoder's token size.

    For ConvNets the mask blocks must also tile the final feature map (multiples of the total
    stride), so every cell of every stage is either wholly masked or wholly visible.
    """
    feature_stride = encoder.stride if isinstance(encoder, ConvNetAdapter) else None
    return MaskGenerator(cfg.image_size, cfg.mask_patch_size, encoder.patch_size, cfg.mask_ratio,
                         feature_stride=feature_stride)


def load_encoder_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise a timm model from a local .safetensors or torch checkpoint.

    Accepts a plain state dict, our exported encoder, or one of our training checkpoints
    (the ``model`` entry, with ``encoder.model.`` prefixes stripped).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"model.init_checkpoint: file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    prefix = "encoder.model."
    state = {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith(("decoder.", "mask_token"))}
    result = model.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(model.state_dict()):
        raise CheckpointError(f"{p} holds no weights for this encoder (no key matched)")
