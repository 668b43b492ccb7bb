"""Crop sampling and the SimMIM / evaluation transforms."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.config import IMAGENET_MEAN, IMAGENET_STD
from simmim.data.transforms import EvalTransform, SimMIMAugment, sample_crop_box
from simmim.errors import ConfigError


@pytest.mark.parametrize(
    "width, height", [(224, 224), (640, 480), (37, 301), (1000, 10), (10, 1000), (1, 1), (3, 2)]
)
def test_crop_box_always_inside_image(width: int, height: int) -> None:
    rng = random.Random(0)
    for _ in range(300):
        left, top, right, bottom = sample_crop_box(width, height, rng=rng)
        assert 0 <= left < right <= width
        assert 0 <= top < bottom <= height


def test_crop_box_area_and_ratio_within_ranges() -> None:
    rng = random.Random(1)
    scale, ratio = (0.3, 0.8), (0.5, 2.0)
    for _ in range(300):
        left, top, right, bottom = sample_crop_box(400, 300, scale, ratio, rng=rng)
        w, h = right - left, bottom - top
        assert scale[0] - 0.01 <= w * h / (400 * 300) <= scale[1] + 0.01
        assert ratio[0] - 0.01 <= w / h <= ratio[1] + 0.01


def test_crop_box_fallback_is_central_and_ratio_clamped() -> None:
    # No crop of a 1000x10 image can have a ratio <= 4/3 and 67% of the area.
    assert sample_crop_box(1000, 10, rng=random.Random(0)) == (493, 0, 506, 10)
    assert sample_crop_box(10, 1000, rng=random.Random(0)) == (0, 493, 10, 506)


def test_crop_box_depends_only_on_the_generator() -> None:
    boxes = [sample_crop_box(500, 400, rng=random.Random(7)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    assert sample_crop_box(500, 400, rng=random.Random(8)) != boxes[0]


def test_augment_output_is_normalised_float_tensor() -> None:
    augment = SimMIMAugment(image_size=32)
    out = augment(Image.new("RGB", (50, 40), (128, 64, 255)), random.Random(0))
    assert out.dtype == torch.float32
    assert out.shape == (3, 32, 32)
    stats = zip((128, 64, 255), IMAGENET_MEAN, IMAGENET_STD, strict=True)
    expected = [(v / 255 - m) / s for v, m, s in stats]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)


def test_augment_is_reproducible_and_flips(make_image) -> None:  # type: ignore[no-untyped-def]
    img = make_image(64, 48)
    augment = SimMIMAugment(image_size=24, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    first = augment(img, random.Random(3))
    assert torch.equal(first, augment(img, random.Random(3)))
    outputs = [augment(img, random.Random(seed)) for seed in range(8)]
    flipped = [torch.equal(out, first.flip(-1)) for out in outputs]
    same = [torch.equal(out, first) for out in outputs]
    # The crop covers the whole image, so the only randomness left is the flip.
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert any(flipped) and any(same)
    no_flip = SimMIMAugment(image_size=24, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=False)
    assert all(torch.equal(no_flip(img, random.Random(s)), first) for s in range(8) if same[s])


def test_eval_transform_is_center_crop_of_shorter_side() -> None:
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, 15:45] = 200  # the central 30x30 square is bright, the sides dark
    img = Image.fromarray(pixels)
    out = EvalTransform(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)(img)
    assert out.shape == (3, 16, 16)
    # Same as resizing the shorter side to 16 and cutting the central 16 columns.
    reference = img.resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16))
    expected = torch.from_numpy(np.asarray(reference, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(out, expected, atol=0.02)
    assert torch.allclose(out[:, :, 2:-2], torch.tensor(200 / 255), atol=1e-3)


def test_invalid_ranges_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="crop scale"):
        SimMIMAugment(image_size=32, scale=(0.9, 0.5))
    with pytest.raises(ConfigError, match="image_size"):
        EvalTransform(image_size=0)
