"""The fast training path: no per-step host syncs, persistent workers, device-side JPEG decode."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.checkpoint import CheckpointManager
from simmim.data import PretrainDataset, ResumableSampler, SimMIMAugment, open_source
from simmim.data.gpu_decode import DeviceAugment
from simmim.data.loader import build_pretrain_loader
from simmim.engine import Progress, compile_enabled, train
from simmim.errors import NonFiniteLossError
from simmim.masking import MaskGenerator
from simmim.model import SimMIM
from simmim_service.spec import TrainingSpec, train_config
from tests.conftest import tiny_config


def _jpeg_folder(root: Path, count: int = 40, size: tuple[int, int] = (64, 48)) -> Path:
    """Smooth random colour images (and a few grayscale ones) saved as JPEG."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        if i % 10 == 3:
            img = img.convert("L")
        img.save(root / f"img_{i:03d}.jpg", quality=90)
    return root


def _losses(cfg, **kwargs) -> list[float]:
    seen: list[Progress] = []
    train(cfg, on_progress=seen.append, **kwargs)
    return [p.loss for p in seen]


def test_nan_mid_run_is_caught_before_any_checkpoint_holds_it(digits: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    original = SimMIM.forward
    calls = {"n": 0}

    def poisoned(self, images, mask):
        calls["n"] += self.training  # previews (eval mode) do not count
        loss, rec = original(self, images, mask)
        return (loss * float("nan") if self.training and calls["n"] == 6 else loss), rec

    monkeypatch.setattr(SimMIM, "forward", poisoned)
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"max_steps": 20},
                      run={"log_every": 10, "checkpoint_every": 4})
    with pytest.raises(NonFiniteLossError, match="at step 5") as caught:
        train(cfg)
    assert caught.value.step == 5 and math.isnan(caught.value.loss)
    infos = CheckpointManager(tmp_path / "run" / "checkpoints").list()
    assert [i.step for i in infos] == [4]  # step 8's checkpoint was refused
    state = CheckpointManager(tmp_path / "run" / "checkpoints").load(infos[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert calls["n"] == 8  # caught at the checkpoint of step 8, before the log of step 10


def test_losses_are_read_only_at_log_steps(digits: dict[str, Path], tmp_path: Path) -> None:
    every = _losses(tiny_config(digits["train"], tmp_path / "a", optim={"max_steps": 8}))
    sparse = _losses(tiny_config(digits["train"], tmp_path / "b", optim={"max_steps": 8},
                                 run={"log_every": 3}))
    assert sparse == [every[2], every[5], every[7]]  # steps 3, 6 and the last


def test_persistent_workers_see_every_epoch(digits: dict[str, Path], tmp_path: Path) -> None:
    # batch 64: a few steps per epoch, so 12 steps cross two epoch boundaries
    runs = {}
    for persistent in (True, False):
        cfg = tiny_config(digits["train"], tmp_path / str(persistent),
                          data={"num_workers": 2, "persistent_workers": persistent},
                          optim={"batch_size": 64, "max_steps": 12})
        runs[persistent] = _losses(cfg)
    assert runs[True] == runs[False]


def test_sampler_keys_carry_the_epoch() -> None:
    sampler = ResumableSampler(20, 4, seed=1, with_epoch=True)
    sampler.set_epoch(3, start_batch=1)
    keys = list(sampler)
    assert all(k[0] == 3 for k in keys) and [k[1] for k in keys] == sampler.epoch_indices()[4:]


def test_compile_auto_is_off_on_cpu_and_spec_mirrors_the_config(tmp_path: Path) -> None:
    cfg = train_config(TrainingSpec(), source="-", output_dir="-")
    assert cfg.run.compile == "auto" and cfg.run.tf32 and cfg.data.decode == "auto"
    assert cfg.data.persistent_workers
    assert not compile_enabled(cfg, torch.device("cpu"))
    assert compile_enabled(cfg, torch.device("cuda"))
    off = train_config(TrainingSpec(compile=False, decode="cpu"), source="-", output_dir="-")
    assert not compile_enabled(off, torch.device("cuda")) and off.data.decode == "cpu"


def _datasets(folder: Path, size: int = 32) -> tuple[PretrainDataset, PretrainDataset, list]:
    source = open_source(str(folder))
    boxes: list = []

    class Recording(SimMIMAugment):
        def sample_box(self, width, height, rng):
            box = super().sample_box(width, height, rng)
            boxes.append(box)
            return box

    gen = MaskGenerator(size, 8, 4, 0.6)
    cpu = PretrainDataset(source, Recording(image_size=size), gen, seed=7)
    enc = PretrainDataset(source, SimMIMAugment(image_size=size), gen, seed=7, encoded=True)
    return cpu, enc, boxes


def test_device_decode_draws_the_cpu_crops_and_nearly_the_same_pixels(tmp_path: Path) -> None:
    folder = _jpeg_folder(tmp_path / "jpegs")
    cpu, enc, boxes = _datasets(folder)
    finish = DeviceAugment(enc, "cpu")
    errors = []
    for epoch in (0, 1):
        for index in range(len(cpu)):
            boxes.clear()
            ref = cpu[(epoch, index)]
            sample = enc[(epoch, index)]
            assert "jpeg" in sample and sample["box"] == boxes[0]  # identical crop box
            assert torch.equal(sample["mask"], ref["mask"])
            batch = finish({"encoded": [sample], "index": torch.tensor([index]), "skipped": 0})
            errors.append((batch["image"][0] - ref["image"]).abs().mean().item())
    # normalised units (1/255 of a pixel is ~0.017): interpolation and IDCT rounding only
    assert max(errors) < 0.05, max(errors)
    assert sum(errors) / len(errors) < 0.02, sum(errors) / len(errors)


def test_device_decode_falls_back_for_png_and_corrupt_jpeg(tmp_path: Path) -> None:
    folder = _jpeg_folder(tmp_path / "mixed", count=12)
    Image.open(folder / "img_001.jpg").save(folder / "img_001b.png")
    data = (folder / "img_002.jpg").read_bytes()
    (folder / "img_002.jpg").write_bytes(data[: len(data) // 2])  # truncated: header fine, data not
    cpu, enc, _ = _datasets(folder)
    sampler = ResumableSampler(len(cpu), 13, seed=0, with_epoch=True)
    loader = build_pretrain_loader(enc, sampler, 13, num_workers=0, pin_memory=False)
    sampler.set_epoch(0)
    batch = DeviceAugment(enc, "cpu")(next(iter(loader)))
    keys = list(sampler)
    ref = [cpu.sample(e, i) for e, i in keys]
    assert batch["index"].tolist() == [r["index"] for r in ref]
    assert batch["skipped"] == sum(r["skipped"] for r in ref)
    assert (batch["image"] - torch.stack([r["image"] for r in ref])).abs().mean() < 0.05


def test_training_with_device_decode_on_cpu(tmp_path: Path) -> None:
    folder = _jpeg_folder(tmp_path / "jpegs", count=48)
    base = tiny_config(folder, tmp_path / "cpu", optim={"max_steps": 4})
    gpu = tiny_config(folder, tmp_path / "gpu", optim={"max_steps": 4}, data={"decode": "gpu", "num_workers": 2})
    a, b = _losses(base), _losses(gpu)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=2e-2), (a, b)
