"""Reconstruction previews: what the model makes of a fixed set of masked images.

A preview is one PNG grid, one row per image and four columns:

``original | masked input | reconstruction | reconstruction pasted into the visible pixels``

The images and their masks are chosen once per run from the dataset with the run's seed
(:func:`preview_batch`), so every checkpoint of a run shows the same inputs and the grids can be
compared side by side. Images go through the evaluation transform (shorter side resized, central
square) and are un-normalised with the dataset's mean and std for display; masked pixels of the
"masked input" column are painted :data:`MASK_FILL`.

Rendering (:func:`render_preview`) runs the model in eval mode under ``no_grad`` and restores its
mode and every RNG state it might touch, so writing previews never changes a training run.
Cells are ``image_size`` pixels square, separated and framed by :data:`PAD` pixels of
:data:`BACKGROUND`: a grid of ``n`` images is ``4 * S + 5 * PAD`` wide and ``n * S + (n + 1) * PAD``
high (:func:`grid_size`, :func:`cell_box`).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from simmim.atomic import atomic_write_bytes
from simmim.data.dataset import ImageListDataset
from simmim.data.sources import ImageSource
from simmim.data.transforms import EvalTransform
from simmim.errors import DataError
from simmim.masking import MaskGenerator

PREVIEW_DIR = "previews"
"""Folder of the run directory that holds the previews."""
PREVIEW_NAME = re.compile(r"^step_(\d{8})\.png$")
"""The file name of a preview; the group is the step."""
COLUMNS = ("original", "masked input", "reconstruction", "reconstruction pasted into visible pixels")
PAD = 2
"""Pixels between cells and around the grid."""
BACKGROUND = (255, 255, 255)
MASK_FILL = (128, 128, 128)
"""Colour of masked pixels in the "masked input" column."""
_PREVIEW_SALT = 0x5052_4556  # keeps the preview's draws apart from the training samples' streams


def preview_name(step: int) -> str:
    """``step_00000010.png`` for step 10."""
    return f"step_{step:08d}.png"


def grid_size(rows: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of a preview of ``rows`` images of side ``image_size``."""
    return len(COLUMNS) * image_size + (len(COLUMNS) + 1) * PAD, rows * image_size + (rows + 1) * PAD


def cell_box(row: int, column: int, image_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of one cell of the grid, as PIL's ``crop`` takes it."""
    left = PAD + column * (image_size + PAD)
    top = PAD + row * (image_size + PAD)
    return left, top, left + image_size, top + image_size


@dataclass(frozen=True)
class PreviewBatch:
    """The fixed inputs of a run's previews.

    Attributes:
        images: float32 (N, 3, S, S), normalised with ``mean`` and ``std``.
        mask: uint8 (N, G, G) token-grid masks, 1 = masked.
        indices: The source index of each image.
        mean: Per-channel mean of the normalisation.
        std: Per-channel std of the normalisation.
    """

    images: torch.Tensor
    mask: torch.Tensor
    indices: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def pixel_mask(self) -> torch.Tensor:
        """bool (N, S, S): True on masked pixels (the token mask upsampled)."""
        scale = self.image_size // int(self.mask.shape[-1])
        return self.mask.bool().repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def preview_batch(source: ImageSource, image_size: int, mask_generator: MaskGenerator, count: int,
                  seed: int, mean: tuple[float, ...], std: tuple[float, ...]) -> PreviewBatch:
    """Choose ``count`` readable images of ``source`` and one mask each, from ``seed`` alone.

    Only numpy generators of its own are used: no global RNG state (torch, numpy or random)
    is read or changed. Unreadable images are passed over; a source with fewer readable images
    gives a smaller batch.

    Raises:
        DataError: If ``count`` < 1 or no image can be read.
    """
    if count < 1:
        raise DataError(f"a preview needs at least one image, got {count}")
    order_seq, mask_seq = np.random.SeedSequence([seed, _PREVIEW_SALT]).spawn(2)
    order = np.random.default_rng(order_seq).permutation(len(source))
    dataset = ImageListDataset(source, EvalTransform(image_size, mean=mean, std=std))
    images, indices = [], []
    for index in order:
        sample = dataset[int(index)]
        if sample["ok"]:
            images.append(sample["image"])
            indices.append(int(index))
            if len(images) == count:
                break
    if not images:
        raise DataError(f"no readable image in {source!r} for the reconstruction preview")
    mask_rng = np.random.default_rng(mask_seq)
    masks = [torch.from_numpy(mask_generator(mask_rng)) for _ in images]
    return PreviewBatch(torch.stack(images), torch.stack(masks), tuple(indices), tuple(mean), tuple(std))


def _to_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalised (N, 3, S, S) -> uint8 (N, S, S, 3)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.detach().float().cpu() * s + m).clamp(0.0, 1.0) * 255.0
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def reconstruct(model: nn.Module, batch: PreviewBatch, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model's reconstruction (N, 3, S, S) of the batch, normalised like its input, on the CPU.

    Eval mode under ``no_grad``, in float32; the model's train/eval mode and the CPU and CUDA
    RNG states are restored afterwards, so a training run continues exactly as without it.
    """
    device = torch.device(device)
    was_training = model.training
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        model.eval()
        try:
            _, reconstruction = model(batch.images.to(device), batch.mask.to(device))
        finally:
            model.train(was_training)
    return reconstruction.detach().float().cpu()


def render_grid(batch: PreviewBatch, reconstruction: torch.Tensor) -> Image.Image:
    """The preview grid for ``batch`` and its (normalised) ``reconstruction``."""
    size = batch.image_size
    original = _to_uint8(batch.images, batch.mean, batch.std)
    rebuilt = _to_uint8(reconstruction, batch.mean, batch.std)
    masked = batch.pixel_mask().numpy()[..., None]  # (N, S, S, 1)
    masked_input = np.where(masked, np.asarray(MASK_FILL, dtype=np.uint8), original)
    pasted = np.where(masked, rebuilt, original)
    grid = Image.new("RGB", grid_size(len(original), size), BACKGROUND)
    for row in range(len(original)):
        for column, cells in enumerate((original, masked_input, rebuilt, pasted)):
            grid.paste(Image.fromarray(np.ascontiguousarray(cells[row])), cell_box(row, column, size)[:2])
    return grid


def render_preview(model: nn.Module, batch: PreviewBatch, device: torch.device | str = "cpu") -> Image.Image:
    """Run the model on the batch and draw the grid (see :func:`reconstruct`)."""
    return render_grid(batch, reconstruct(model, batch, device))


def write_preview(model: nn.Module, batch: PreviewBatch, directory: str | Path, step: int,
                  device: torch.device | str = "cpu") -> Path:
    """Render and atomically write ``directory/step_XXXXXXXX.png``; returns its path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / preview_name(step)
    encoded = io.BytesIO()
    render_preview(model, batch, device).save(encoded, format="PNG")
    atomic_write_bytes(target, encoded.getvalue())
    return target


def masked_l1(grid: Image.Image, batch: PreviewBatch) -> float:
    """Mean absolute difference (0-255 scale) between the reconstruction and the original
    columns of a rendered grid, over masked pixels only."""
    size = batch.image_size
    masked = batch.pixel_mask().numpy()
    total, count = 0.0, 0
    for row in range(len(batch.indices)):
        original = np.asarray(grid.crop(cell_box(row, 0, size)), dtype=np.float64)
        rebuilt = np.asarray(grid.crop(cell_box(row, 2, size)), dtype=np.float64)
        diff = np.abs(rebuilt - original)[masked[row]]
        total += float(diff.sum())
        count += diff.size
    return total / max(count, 1)
