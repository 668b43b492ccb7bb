import math

import numpy as np
import pytest

from simmim.errors import ConfigError
from simmim.masking import MaskGenerator, check_mask_geometry


@pytest.mark.parametrize(
    ("size", "mask_patch", "model_patch", "ratio"),
    [(192, 32, 4, 0.6), (224, 32, 16, 0.6), (224, 32, 16, 0.75), (64, 16, 8, 0.5), (96, 32, 32, 0.1)],
)
def test_exact_count_and_block_structure(size: int, mask_patch: int, model_patch: int, ratio: float) -> None:
    gen = MaskGenerator(size, mask_patch, model_patch, ratio)
    rng = np.random.default_rng(0)
    blocks = (size // mask_patch) ** 2
    scale = mask_patch // model_patch
    for _ in range(20):
        mask = gen(rng)
        assert mask.shape == (size // model_patch, size // model_patch)
        assert mask.dtype == np.uint8
        # Constant inside each mask block: the block grid decides, tokens follow.
        coarse = mask[::scale, ::scale]
        assert np.array_equal(np.kron(coarse, np.ones((scale, scale), dtype=np.uint8)), mask)
        assert coarse.sum() == math.ceil(ratio * blocks)


def test_ceil_rounding_matches_paper() -> None:
    # 192 px / 32 px blocks = 36 blocks; 0.6 * 36 = 21.6 -> 22 blocks masked.
    gen = MaskGenerator(192, 32, 4, 0.6)
    assert gen.num_masked == 22
    assert gen(np.random.default_rng(1)).sum() == 22 * 8 * 8


def test_masks_are_random_and_uniform() -> None:
    gen = MaskGenerator(224, 32, 16, 0.6)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng)[::2, ::2] for _ in range(4000)])  # (N, 7, 7) block grid
    freq = masks.mean(0)
    assert np.allclose(freq, 30 / 49, atol=0.03)  # every block equally likely
    assert len({m.tobytes() for m in masks[:100]}) == 100


def test_same_seed_same_mask() -> None:
    gen = MaskGenerator(224, 32, 16, 0.6)
    assert np.array_equal(gen(np.random.default_rng(7)), gen(np.random.default_rng(7)))


def test_errors_name_the_numbers_that_disagree() -> None:
    with pytest.raises(ConfigError) as err:
        MaskGenerator(200, 32, 16, 0.6)
    assert "image_size (200)" in str(err.value) and "mask_patch_size (32)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        MaskGenerator(224, 32, 14, 0.6)
    assert "mask_patch_size (32)" in str(err.value) and "(14)" in str(err.value)
    problems = check_mask_geometry(200, 24, 16, 1.5)
    assert len(problems) == 3
