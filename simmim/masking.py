"""SimMIM random masking (Xie et al. 2021, Sec. 3.1 and microsoft/SimMIM ``MaskGenerator``).

Masking is decided on a coarse grid of ``mask_patch_size`` pixel blocks, independent of the
model's patch size, then upsampled to the model's token grid. Exactly ``ceil(ratio * n)``
blocks are masked in every image.
"""

from __future__ import annotations

import math

import numpy as np

from simmim.errors import ConfigError


class MaskGenerator:
    """Draws one SimMIM mask at the model's token resolution.

    Args:
        input_size: Image side in pixels.
        mask_patch_size: Side of a masked block in pixels (paper default 32).
        model_patch_size: Side in pixels of one token of the encoder's first stage
            (16 for ViT-B/16, 4 for Swin).
        mask_ratio: Fraction of blocks to mask (paper default 0.6).
        feature_stride: ConvNets: the total stride (32); blocks must be a multiple of it.
    """

    def __init__(
        self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float,
        feature_stride: int | None = None,
    ) -> None:
        problems = check_mask_geometry(input_size, mask_patch_size, model_patch_size, mask_ratio, feature_stride)
        if problems:
            raise ConfigError(problems)
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.blocks_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.num_blocks = self.blocks_per_side**2
        self.num_masked = math.ceil(self.num_blocks * mask_ratio)

    @property
    def token_grid(self) -> int:
        """Side of the returned mask (tokens per image side)."""
        return self.blocks_per_side * self.scale

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """Return a (token_grid, token_grid) uint8 mask, 1 = masked."""
        chosen = rng.permutation(self.num_blocks)[: self.num_masked]
        blocks = np.zeros(self.num_blocks, dtype=np.uint8)
        blocks[chosen] = 1
        grid = blocks.reshape(self.blocks_per_side, self.blocks_per_side)  # (b, b)
        return grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1)  # (b*s, b*s)


def check_mask_geometry(
    input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float,
    feature_stride: int | None = None,
) -> list[str]:
    """Every reason these sizes cannot make a SimMIM mask (empty list when they can).

    ``feature_stride`` (ConvNets: the total stride, 32) adds two rules: the image must tile
    into final-map cells, and each mask block must cover whole cells, so that the mask holds
    exactly at every stage's resolution.
    """
    problems = []
    if feature_stride is not None:
        if input_size % feature_stride != 0:
            problems.append(
                f"image_size ({input_size}) is not divisible by the ConvNet's total stride ({feature_stride}); "
                f"try image_size={max(1, round(input_size / feature_stride)) * feature_stride}"
            )
        if mask_patch_size % feature_stride != 0:
            problems.append(
                f"mask_patch_size ({mask_patch_size}) must be a multiple of the ConvNet's total stride "
                f"({feature_stride}) so every masked block covers whole cells of the final feature map; "
                f"use {feature_stride} (or {2 * feature_stride}, ...)"
            )
    stride_problems = bool(problems)  # the block rules below would only restate them
    if not stride_problems and input_size % mask_patch_size != 0:
        problems.append(
            f"image_size ({input_size}) is not divisible by mask_patch_size ({mask_patch_size}); "
            f"try image_size={max(1, round(input_size / mask_patch_size)) * mask_patch_size}"
        )
    if not stride_problems and mask_patch_size % model_patch_size != 0:
        problems.append(
            f"mask_patch_size ({mask_patch_size}) is not divisible by the model's patch size "
            f"({model_patch_size}); use a multiple of {model_patch_size}"
        )
    if not 0.0 < mask_ratio < 1.0:
        problems.append(f"mask_ratio ({mask_ratio}) must be between 0 and 1 (exclusive)")
    return problems
