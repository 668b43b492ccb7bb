"""SimMIM augmentations driven by an explicit random generator.

SimMIM pretrains with only a random resized crop (scale 0.67-1) and a horizontal flip.
Taking the generator as an argument, instead of using global RNG state, makes every
sample a pure function of (seed, epoch, index), which exact resume relies on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from simmim.config import IMAGENET_MEAN, IMAGENET_STD
from simmim.data.images import Box, to_rgb
from simmim.errors import ConfigError

_MAX_TRIES = 10


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.67, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """Draw a random-resized-crop box, as (left, top, right, bottom) in whole pixels.

    Up to 10 times, draw an area fraction uniformly from ``scale`` and an aspect ratio
    log-uniformly from ``ratio``; keep the first box that fits. If none fits (very
    elongated images), fall back to the largest central crop whose aspect ratio is
    clamped into ``ratio``.

    Args:
        width: Image width in pixels (>= 1).
        height: Image height in pixels (>= 1).
        scale: Range of the crop's area as a fraction of the image area.
        ratio: Range of the crop's width / height.
        rng: Source of randomness; the only one used.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_MAX_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = rng.randint(0, width - crop_w)
            top = rng.randint(0, height - crop_h)
            return left, top, left + crop_w, top + crop_h
    image_ratio = width / height
    if image_ratio < ratio[0]:  # too tall: full width, height from the narrowest ratio
        crop_w, crop_h = width, min(height, max(1, round(width / ratio[0])))
    elif image_ratio > ratio[1]:  # too wide: full height, width from the widest ratio
        crop_w, crop_h = min(width, max(1, round(height * ratio[1]))), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def to_normalized_tensor(
    img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) tensor, scaled to [0, 1] then normalised."""
    pixels = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    std_arr = np.asarray(std, dtype=np.float32)
    pixels = pixels * (1.0 / (255.0 * std_arr)) - np.asarray(mean, dtype=np.float32) / std_arr
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _check_ranges(image_size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    problems = []
    if image_size < 1:
        problems.append(f"image_size must be >= 1 (got {image_size})")
    if not 0 < scale[0] <= scale[1] <= 1:
        problems.append(f"crop scale must satisfy 0 < min <= max <= 1 (got {scale})")
    if not 0 < ratio[0] <= ratio[1]:
        problems.append(f"crop ratio must satisfy 0 < min <= max (got {ratio})")
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class SimMIMAugment:
    """Random resized crop + optional horizontal flip + normalisation (SimMIM pretraining).

    The crop box can be chosen before decoding (:meth:`sample_box`) and applied after
    (:meth:`apply`), which lets the dataset decode large JPEGs at reduced scale. Both
    paths draw from ``rng`` in the same order: crop box, then flip.

    Attributes:
        image_size: Output side S in pixels.
        scale: Crop area range as a fraction of the image.
        ratio: Crop aspect-ratio range.
        hflip: Flip horizontally with probability 0.5.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
    """

    image_size: int
    scale: tuple[float, float] = (0.67, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_ranges(self.image_size, self.scale, self.ratio)

    def sample_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """Draw the crop box for an upright image of this size."""
        return sample_crop_box(width, height, self.scale, self.ratio, rng=rng)

    def apply(self, img: Image.Image, box: Box, rng: random.Random) -> torch.Tensor:
        """Crop ``box`` and resize to S x S in one bicubic step, maybe flip, normalise."""
        size = self.image_size
        out = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(out, self.mean, self.std)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """Augment a decoded image into a float32 (3, S, S) normalised tensor."""
        return self.apply(img, self.sample_box(img.width, img.height, rng), rng)


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic resize (shorter side to S, bicubic) + center crop S + normalisation.

    Done as one resize of the central square (side = the shorter side), which is the same
    crop as resizing first and cropping after, without the intermediate image.

    Attributes:
        image_size: Output side S in pixels.
        mean: Per-channel mean used for normalisation.
        std: Per-channel standard deviation used for normalisation.
    """

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        _check_ranges(self.image_size, (1.0, 1.0), (1.0, 1.0))

    def center_box(self, width: int, height: int) -> Box:
        """The central square of an image of this size."""
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def apply(self, img: Image.Image, box: Box) -> torch.Tensor:
        """Resize ``box`` of ``img`` to S x S (bicubic) and normalise."""
        size = self.image_size
        out = to_rgb(img).resize((size, size), Image.Resampling.BICUBIC, box=box)
        return to_normalized_tensor(out, self.mean, self.std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Transform a decoded image into a float32 (3, S, S) normalised tensor."""
        return self.apply(img, self.center_box(img.width, img.height))
