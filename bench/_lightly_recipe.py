"""lightly's SimMIM recipe as a module, for side-by-side benchmarks with ``simmim``.

Follows lightly's ``examples/pytorch/simmim.py`` (written here from its description, using
lightly's public building blocks): ``MaskedVisionTransformerTIMM`` around a timm ViT (MAE-style
re-initialisation, fixed 2-D sin-cos position table), a random 75 % token mask at the model's
patch size (the class token, index 0, is never masked), all tokens encoded with the masked ones
replaced by the mask token, a linear decoder on the encoded masked tokens, L1 against the
patchified input at those tokens. Its downstream embedding is the class token.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from lightly.models import utils as lightly_utils
from lightly.models.modules import MaskedVisionTransformerTIMM
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class LightlySimMIM(nn.Module):
    """Backbone + linear decoder + L1 loss, as in lightly's SimMIM example.

    Args:
        vit: A timm ``VisionTransformer`` (with a class token).
        mask_ratio: Fraction of patch tokens replaced by the mask token.
    """

    def __init__(self, vit: VisionTransformer, mask_ratio: float = 0.75) -> None:
        super().__init__()
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.sequence_length = self.backbone.sequence_length
        self.mask_ratio = mask_ratio
        self.decoder = nn.Linear(int(vit.embed_dim), self.patch_size**2 * 3)
        self.criterion = nn.L1Loss()

    def random_mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Indices (B, M) of masked tokens in the class-token-first sequence (never 0)."""
        _, idx_mask = lightly_utils.random_token_mask(
            size=(batch_size, self.sequence_length), mask_ratio=self.mask_ratio, device=device
        )
        return idx_mask

    def forward(self, images: torch.Tensor, idx_mask: torch.Tensor) -> torch.Tensor:
        """L1 loss of the reconstruction of the masked patches of ``images`` (B, 3, H, W)."""
        features = self.backbone.encode(images=images, idx_mask=idx_mask)  # (B, 1+L, D)
        predictions = self.decoder(lightly_utils.get_at_index(features, idx_mask))  # (B, M, p*p*3)
        target = lightly_utils.patchify(images, self.patch_size)  # (B, L, p*p*3)
        target = lightly_utils.get_at_index(target, idx_mask - 1)  # class token has no patch
        return self.criterion(predictions, target)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class token, mean of patch tokens), each (B, D), of unmasked images."""
        tokens = self.backbone.encode(images=images)  # (B, 1+L, D), final norm applied
        prefix = self.backbone.vit.num_prefix_tokens
        return tokens[:, 0], tokens[:, prefix:].mean(dim=1)


def lightly_vit_kwargs(encoder_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our timm kwargs with lightly's pooling: the same architecture, class-token output."""
    kwargs = dict(encoder_kwargs)
    kwargs["global_pool"] = "token"
    return kwargs


def build_lightly_simmim(name: str, vit_kwargs: dict[str, Any], mask_ratio: float = 0.75) -> LightlySimMIM:
    """A fresh timm ViT wrapped in lightly's recipe (weights re-initialised by lightly)."""
    vit = timm.create_model(name, pretrained=False, **vit_kwargs)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"lightly's recipe needs a timm VisionTransformer, {name!r} is {type(vit).__name__}")
    return LightlySimMIM(vit, mask_ratio=mask_ratio)


def no_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as ``simmim`` builds them: no decay on 1-D params, tokens and position tables."""
    skip = ("mask_token", "pos_embed", "cls_token", "reg_token")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
