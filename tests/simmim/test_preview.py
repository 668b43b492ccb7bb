"""Reconstruction previews on real digits with a tiny ViT: layout, pixels, learning, determinism."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig
from simmim.data import open_source
from simmim.engine import Progress, train
from simmim.model import SimMIM, build_mask_generator, build_model
from simmim.preview import (
    BACKGROUND,
    MASK_FILL,
    PAD,
    PreviewBatch,
    cell_box,
    grid_size,
    masked_l1,
    preview_batch,
    reconstruct,
    render_grid,
)
from tests.conftest import tiny_config

ORIGINAL, MASKED, RECONSTRUCTION, PASTED = range(4)


def _batch(cfg: TrainConfig, model: SimMIM, count: int = 8) -> PreviewBatch:
    mask_gen = build_mask_generator(cfg.model, model.encoder)
    return preview_batch(open_source(cfg.data.source), cfg.model.image_size, mask_gen, count, cfg.run.seed,
                         IMAGENET_MEAN, IMAGENET_STD)


def _cell(grid: Image.Image, row: int, column: int, size: int = 32) -> np.ndarray:
    return np.asarray(grid.crop(cell_box(row, column, size)), dtype=np.int16)


def _column(grid: Image.Image, column: int, rows: int) -> list[np.ndarray]:
    return [_cell(grid, row, column) for row in range(rows)]


def _tensorboard_steps(directory: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


def test_grid_layout_and_pixels(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = _batch(cfg, model)
    assert batch.images.shape == (8, 3, 32, 32) and batch.mask.shape == (8, 8, 8)
    assert len(set(batch.indices)) == 8

    rng_before = torch.get_rng_state()
    assert model.training
    reconstruction = reconstruct(model, batch)
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)  # mode and RNG restored
    grid = Image.open(io.BytesIO(_png(render_grid(batch, reconstruction))))

    # 8 rows x 4 columns of 32 px cells, 2 px gutters between and around them
    assert grid.size == grid_size(8, 32) == (4 * 32 + 5 * PAD, 8 * 32 + 9 * PAD) == (138, 274)
    assert grid.mode == "RGB"
    pixels = np.asarray(grid)
    assert (pixels[:PAD] == BACKGROUND).all() and (pixels[:, :PAD] == BACKGROUND).all()
    assert (pixels[:, PAD + 32:2 * PAD + 32] == BACKGROUND).all()  # gutter after the first column

    masked = batch.pixel_mask().numpy()
    assert 0.5 < masked.mean() < 0.75  # ceil(0.6 * 16) = 10 of 16 mask blocks
    for row in range(8):
        original, masked_input = _cell(grid, row, ORIGINAL), _cell(grid, row, MASKED)
        rebuilt, pasted = _cell(grid, row, RECONSTRUCTION), _cell(grid, row, PASTED)
        hidden, visible = masked[row], ~masked[row]
        # the masked input is the original on visible pixels and the fill colour elsewhere
        assert (masked_input[visible] == original[visible]).all()
        assert (masked_input[hidden] == MASK_FILL).all()
        differs = np.abs(masked_input[hidden] - original[hidden]).max(axis=-1) > 0
        assert differs.mean() > 0.9, differs.mean()
        # pasted = original where visible, the reconstruction where masked
        assert (pasted[visible] == original[visible]).all()
        assert (pasted[hidden] == rebuilt[hidden]).all()
        assert not (rebuilt[visible] == original[visible]).all()  # the reconstruction column is raw output

    # the original column is the batch, un-normalised
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = ((batch.images[0] * std + mean).clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(_cell(grid, 0, ORIGINAL) - expected).max() == 0


def test_the_same_images_and_masks_every_time(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run")
    model = build_model(cfg.model)
    torch.manual_seed(123)
    np_state = np.random.get_state()
    first = _batch(cfg, model)
    torch.manual_seed(456)  # global RNG states play no part
    second = _batch(cfg, model)
    assert first.indices == second.indices
    assert torch.equal(first.images, second.images) and torch.equal(first.mask, second.mask)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()  # numpy's global state untouched
    other_seed = _batch(cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": 1})}), model)
    assert other_seed.indices != first.indices
    assert not torch.equal(first.mask[0], first.mask[1])  # one mask per image, not one for all


def test_previews_at_every_checkpoint_show_learning(digits: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(digits["train"], out, optim={"max_steps": 60, "warmup_steps": 4},
                      run={"checkpoint_every": 10})
    assert cfg.run.preview_images == 8 and cfg.run.tensorboard  # the defaults
    train(cfg)

    names = sorted(p.name for p in (out / "previews").iterdir())
    assert names == [f"step_{s:08d}.png" for s in (10, 20, 30, 40, 50, 60)]  # periodic + the final
    grids = [Image.open(out / "previews" / name) for name in names]
    assert {g.size for g in grids} == {(138, 274)} and {g.format for g in grids} == {"PNG"}

    # the same inputs at every checkpoint
    for grid in grids[1:]:
        for column in (ORIGINAL, MASKED):
            assert all((a == b).all() for a, b in zip(_column(grid, column, 8), _column(grids[0], column, 8),
                                                      strict=True))
    model = build_model(cfg.model)
    batch = _batch(cfg, model)
    chosen = _column(_grid_of(batch), ORIGINAL, 8)  # the batch this test chooses on its own
    assert all((a == b).all() for a, b in zip(_column(grids[-1], ORIGINAL, 8), chosen, strict=True))

    # reconstruction error on masked pixels (0-255) falls as the model learns
    errors = [masked_l1(g, batch) for g in grids]
    assert errors[-1] < 0.85 * errors[0], errors  # measured: 70.8 -> 49.6

    # TensorBoard events beside metrics.jsonl, one scalar per logged step
    assert (out / "metrics.jsonl").is_file()
    for tag in ("loss", "lr", "images_per_sec", "data_wait_fraction"):
        assert _tensorboard_steps(out / "tensorboard", tag) == list(range(1, 61)), tag


def test_resume_stays_bit_exact_with_previews(digits: dict[str, Path], tmp_path: Path) -> None:
    def losses(cfg: TrainConfig, **kwargs: object) -> list[float]:
        seen: list[Progress] = []
        train(cfg, on_progress=seen.append, **kwargs)  # type: ignore[arg-type]
        return [p.loss for p in seen]

    full = losses(tiny_config(digits["train"], tmp_path / "a"))
    cfg_b = tiny_config(digits["train"], tmp_path / "b")
    calls = {"n": 0}

    def stop_after_seven() -> bool:
        calls["n"] += 1
        return calls["n"] == 7

    first = losses(cfg_b, should_stop=stop_after_seven)
    second = losses(cfg_b)
    assert first + second == full  # previews at steps 4 and 7 changed nothing
    a, b = tmp_path / "a" / "previews", tmp_path / "b" / "previews"
    assert sorted(p.name for p in b.iterdir()) == ["step_00000004.png", "step_00000007.png",
                                                   "step_00000008.png", "step_00000012.png"]
    for name in ("step_00000004.png", "step_00000008.png", "step_00000012.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the resumed run's events replace nothing twice: each step once
    assert _tensorboard_steps(tmp_path / "b" / "tensorboard", "loss") == list(range(1, 13))


def test_previews_off_and_tensorboard_missing(digits: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"max_steps": 2}, run={"preview_images": 0})
    with caplog.at_level(logging.WARNING, logger="simmim.metrics_log"):
        result = train(cfg)
    assert result.steps == 2 and result.checkpoint is not None
    assert not (tmp_path / "run" / "previews").exists() and not (tmp_path / "run" / "tensorboard").exists()
    assert "pip install tensorboard" in caplog.text

    off = tiny_config(digits["train"], tmp_path / "off", optim={"max_steps": 2},
                      run={"preview_images": 2, "tensorboard": False})
    train(off)
    assert not (tmp_path / "off" / "tensorboard").exists()
    (preview,) = (tmp_path / "off" / "previews").iterdir()
    assert Image.open(preview).size == grid_size(2, 32) == (138, 2 * 32 + 3 * PAD)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _grid_of(batch: PreviewBatch) -> Image.Image:
    """A grid whose reconstruction is the input itself (only its original column is used)."""
    return render_grid(batch, batch.images)
