"""Small real datasets written to disk as image files, for demos, tests and benchmarks.

scikit-learn's digits (1,797 labelled 8x8 scans of handwritten digits, bundled with the
package, no download) upscaled to RGB PNGs in an ImageFolder layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 (N, 8, 8) images and (N,) labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'simmim-service[eval]'") from err
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test split of indices, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def digit_image(image: np.ndarray, size: int) -> Image.Image:
    """One 8x8 digit as an RGB image of ``size`` px (bicubic upscaling, white strokes on black)."""
    return Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def write_digits(root: str | Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                 limit: int | None = None) -> dict[str, Path]:
    """Write ``root/{train,test}/<digit>/<index>.png``; returns the two split folders.

    Existing files are kept, so calling it again is cheap.
    """
    images, labels = load_digits_arrays()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    splits = dict(zip(("train", "test"), split_indices(labels, test_fraction, seed), strict=True))
    out = {}
    for split, indices in splits.items():
        folder = Path(root) / split
        for i in indices:
            path = folder / str(labels[i]) / f"{i:04d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                digit_image(images[i], size).save(path)
        out[split] = folder
    return out
