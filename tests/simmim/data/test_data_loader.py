"""The pretraining DataLoader: worker processes give the same batches as the main process."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from simmim.data.dataset import PretrainDataset
from simmim.data.loader import build_pretrain_loader, collate_pretrain, default_num_workers
from simmim.data.sampler import ResumableSampler
from simmim.data.sources import open_source
from simmim.data.transforms import SimMIMAugment
from simmim.masking import MaskGenerator

MakeImage = Callable[..., Image.Image]


@pytest.fixture
def image_tar(tmp_path: Path, make_image: MakeImage) -> Path:
    """An uncompressed tar of 12 small JPEG/PNG images."""
    folder = tmp_path / "tar_src"
    folder.mkdir()
    for i in range(12):
        make_image(36 + i, 44 - i, seed=i).save(folder / f"img{i:02d}.{'jpg' if i % 3 else 'png'}")
    path = tmp_path / "images.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname="images")
    return path


def _batches(tar_path: Path, num_workers: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    source = open_source(tar_path)
    source.read_bytes(0)  # the parent holds an open handle before workers fork
    dataset = PretrainDataset(source, SimMIMAugment(32), MaskGenerator(32, 8, 4, 0.6), seed=5)
    sampler = ResumableSampler(len(dataset), batch_size=4, seed=5)
    loader = build_pretrain_loader(dataset, sampler, 4, num_workers, pin_memory=False)
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    return list(loader)


def test_workers_give_the_same_batches_as_main_process(image_tar: Path) -> None:
    expected = _batches(image_tar, num_workers=0, epoch=1)
    actual = _batches(image_tar, num_workers=2, epoch=1)
    assert len(expected) == len(actual) == 3
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["mask"], b["mask"])
        assert a["skipped"] == b["skipped"] == 0


def test_collate_stacks_and_sums_skipped() -> None:
    samples = [
        {
            "image": torch.zeros(3, 4, 4),
            "mask": torch.ones(2, 2, dtype=torch.uint8),
            "index": i,
            "skipped": i,
        }
        for i in range(3)
    ]
    batch = collate_pretrain(samples)
    assert batch["image"].shape == (3, 3, 4, 4) and batch["mask"].shape == (3, 2, 2)
    assert batch["index"].tolist() == [0, 1, 2] and batch["skipped"] == 3
    assert "mask" not in collate_pretrain([{k: v for k, v in samples[0].items() if k != "mask"}])


def test_default_workers_and_batch_size_check(image_tar: Path) -> None:
    assert 0 <= default_num_workers() <= 8
    dataset = PretrainDataset(open_source(image_tar), SimMIMAugment(32), None, seed=0)
    with pytest.raises(ValueError, match="same per-process batch size"):
        build_pretrain_loader(dataset, ResumableSampler(12, 4, 0), 3, 0, False)
