"""SimMIM reconstruction loss (Xie et al. 2021, Eq. 1 and microsoft/SimMIM ``models/simmim.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Token-grid mask (B, h, w) to a pixel mask (B, 1, h*p, w*p)."""
    pixels = mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)  # (B, H, W)
    return pixels.unsqueeze(1)  # (B, 1, H, W)


def masked_l1_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """L1 between prediction and the normalised input, on masked pixels only.

    ``sum(|pred - x| * m) / (sum(m) + eps) / C``: the mean absolute error per masked pixel
    and channel, where ``m`` is the token mask upsampled to pixels. Computed in fp32.

    Args:
        prediction: Reconstruction (B, C, H, W).
        target: The normalised input images (B, C, H, W).
        mask: Token-grid mask (B, H/p, W/p), 1 = masked.
        patch_size: Pixels per token side.
    """
    pixel_mask = upsample_mask(mask.to(torch.float32), patch_size)  # (B, 1, H, W)
    error = F.l1_loss(prediction.float(), target.float(), reduction="none")  # (B, C, H, W)
    return (error * pixel_mask).sum() / (pixel_mask.sum() + eps) / target.shape[1]
