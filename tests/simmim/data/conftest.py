"""Fixtures that write small real image files (digits from scikit-learn, gradients, noise)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

MakeImage = Callable[..., Image.Image]
Encode = Callable[..., bytes]


@pytest.fixture(scope="session")
def digit_arrays() -> np.ndarray:
    """The 1797 8x8 handwritten digits, values 0-16 (bundled with scikit-learn)."""
    return load_digits().images


@pytest.fixture
def make_image(digit_arrays: np.ndarray) -> MakeImage:
    """``make_image(width, height, seed)``: an RGB upscaled digit over a coloured gradient."""

    def make(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
        rng = np.random.default_rng(seed)
        digit = Image.fromarray((digit_arrays[seed % len(digit_arrays)] * 15).astype(np.uint8))
        ink = np.asarray(digit.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        tint = rng.uniform(0.3, 1.0, size=3)
        base = np.stack([xs / max(width, 1), ys / max(height, 1), (xs + ys) / (width + height)])
        pixels = 120 * base.transpose(1, 2, 0) * tint + ink[..., None] * 0.5
        pixels += rng.normal(0, 4, size=pixels.shape)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")

    return make


@pytest.fixture
def encode() -> Encode:
    """``encode(img, "JPEG" | "PNG" | ..., **save_options)`` -> the encoded bytes."""

    def run(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    return run


@pytest.fixture
def image_folder(tmp_path: Path, make_image: MakeImage) -> Path:
    """A folder with 4 images in nested dirs plus files that must be ignored."""
    root = tmp_path / "images"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    make_image(seed=1).save(root / "a.jpg")
    make_image(seed=2).save(root / "sub" / "b.png")
    make_image(seed=3).save(root / "sub" / "deep" / "c.JPEG", format="JPEG")
    make_image(seed=4).save(root / "Z.PNG", format="PNG")
    make_image(seed=5).save(root / ".hidden" / "d.png")
    make_image(seed=6).save(root / "sub" / "._e.png")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.npy").write_bytes(b"\x93NUMPY")
    return root
