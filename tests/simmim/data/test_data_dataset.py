"""Datasets: reproducible samples, skipping unreadable images, inference batches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data.dataset import ImageListDataset, PretrainDataset, sample_rng
from simmim.data.loader import build_pretrain_loader
from simmim.data.sampler import ResumableSampler
from simmim.data.sources import FolderSource
from simmim.data.transforms import EvalTransform, SimMIMAugment
from simmim.errors import DataError
from simmim.masking import MaskGenerator

MakeImage = Callable[..., Image.Image]


@pytest.fixture
def mixed_folder(tmp_path: Path, make_image: MakeImage) -> Path:
    """8 images (JPEG and PNG, various sizes); 02.jpg is truncated."""
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(8):
        img = make_image(40 + 7 * i, 60 - 3 * i, seed=i)
        img.save(root / (f"{i:02d}.jpg" if i % 2 == 0 else f"{i:02d}.png"))
    broken = (root / "02.jpg").read_bytes()
    (root / "02.jpg").write_bytes(broken[: len(broken) // 2])
    return root


def _dataset(folder: Path, seed: int = 0) -> PretrainDataset:
    return PretrainDataset(
        FolderSource(folder), SimMIMAugment(image_size=32), MaskGenerator(32, 8, 4, 0.6), seed
    )


def test_sample_rng_is_a_function_of_seed_epoch_index() -> None:
    def draw(seed: int, epoch: int, index: int) -> tuple[float, np.ndarray]:
        augment_rng, mask_rng = sample_rng(seed, epoch, index)
        return augment_rng.random(), mask_rng.random(4)

    a, b = draw(1, 2, 3), draw(1, 2, 3)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    for other in (draw(2, 2, 3), draw(1, 3, 3), draw(1, 2, 4)):
        assert other[0] != a[0] and not np.array_equal(other[1], a[1])


def test_samples_are_reproducible_and_change_with_epoch(mixed_folder: Path) -> None:
    first, second = _dataset(mixed_folder), _dataset(mixed_folder)
    for index in (0, 1, 5):
        a, b = first[index], second[index]
        assert a["image"].shape == (3, 32, 32) and a["image"].dtype == torch.float32
        assert a["mask"].shape == (8, 8) and a["mask"].dtype == torch.uint8
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["index"] == index and a["skipped"] == 0
    second.set_epoch(1)
    a, b = first[5], second[5]
    assert not torch.equal(a["image"], b["image"])
    assert not torch.equal(a["mask"], b["mask"])


def test_unreadable_image_is_skipped_and_logged_once(
    mixed_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = _dataset(mixed_folder)
    with caplog.at_level(logging.WARNING, logger="simmim.data.dataset"):
        sample = dataset[2]
        dataset[2]
    assert sample["index"] == 3 and sample["skipped"] == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "02.jpg" in warnings[0] and "truncated" in warnings[0]
    # The replacement still draws from the requested index: it differs from sample 3.
    assert not torch.equal(sample["image"], dataset[3]["image"])


def test_batches_stay_full_when_images_are_skipped(mixed_folder: Path) -> None:
    dataset = _dataset(mixed_folder)
    sampler = ResumableSampler(len(dataset), batch_size=4, seed=0)
    loader = build_pretrain_loader(dataset, sampler, 4, num_workers=0, pin_memory=False)
    batches = list(loader)
    assert len(batches) == 2
    assert all(batch["image"].shape == (4, 3, 32, 32) for batch in batches)
    assert all(batch["mask"].shape == (4, 8, 8) for batch in batches)
    assert sum(batch["skipped"] for batch in batches) == 1
    assert 2 not in torch.cat([batch["index"] for batch in batches]).tolist()


def test_too_many_unreadable_images_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "junk"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="validate-data"):
        _dataset(root)[1]


def test_image_list_dataset_keeps_positions(mixed_folder: Path) -> None:
    dataset = ImageListDataset(FolderSource(mixed_folder), EvalTransform(image_size=16))
    batches = list(DataLoader(dataset, batch_size=4))
    ok = torch.cat([batch["ok"] for batch in batches]).tolist()
    assert ok == [True, True, False, True, True, True, True, True]
    assert torch.cat([batch["index"] for batch in batches]).tolist() == list(range(8))
    assert torch.count_nonzero(batches[0]["image"][2]) == 0
    assert torch.equal(dataset[5]["image"], dataset[5]["image"])
