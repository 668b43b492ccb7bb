"""Datasets that turn an image source into training samples or inference batches.

Every pretraining sample is a pure function of (seed, epoch, index): the augmentation and
the mask draw from generators seeded by exactly those three numbers, so a resumed run sees
the same pixels and masks as an uninterrupted one, regardless of worker count.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from simmim.data.images import DEFAULT_MAX_PIXELS, decode_for_crop, exif_orientation, open_image
from simmim.data.sources import ImageSource
from simmim.data.transforms import EvalTransform, SimMIMAugment
from simmim.errors import DataError, ImageDecodeError
from simmim.masking import MaskGenerator

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_UNREADABLE = 50


def sample_rng(seed: int, epoch: int, index: int) -> tuple[random.Random, np.random.Generator]:
    """Independent generators for one sample: (augmentation, mask).

    Both derive from ``np.random.SeedSequence([seed, epoch, index])``, which mixes the three
    numbers so that nearby seeds, epochs or indices give unrelated streams.

    Args:
        seed: The run's seed (>= 0).
        epoch: Epoch number (>= 0).
        index: Sample index as requested by the sampler (>= 0).
    """
    augment_seq, mask_seq = np.random.SeedSequence([seed, epoch, index]).spawn(2)
    augment_rng = random.Random(int(augment_seq.generate_state(1, np.uint64)[0]))
    return augment_rng, np.random.default_rng(mask_seq)


class _WarnOnce:
    """Logs each unreadable image once per process instead of once per epoch."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, err: ImageDecodeError) -> None:
        if err.name not in self._seen:
            self._seen.add(err.name)
            logger.warning("skipping unreadable image %s: %s", err.name, err.reason)


class PretrainDataset(Dataset[dict[str, Any]]):
    """SimMIM pretraining samples: an augmented image and (optionally) its random mask.

    An unreadable image is replaced by the next readable one, ``(index + k) % len`` for
    k = 1, 2, ..., so a batch stays full; ``skipped`` counts the replacements. The random
    draws still come from the originally requested index, so the result is deterministic.

    The epoch of a sample is either part of the requested key, ``dataset[(epoch, index)]``
    (what ``ResumableSampler(with_epoch=True)`` yields; works with persistent DataLoader
    workers), or, for a plain ``dataset[index]``, the one given to :meth:`set_epoch` (workers
    copy the dataset when an iterator is created, so that needs non-persistent workers).

    With ``encoded=True`` a JPEG sample is not decoded: it carries the file bytes (``jpeg``,
    uint8 tensor), the crop ``box`` in upright full-size pixels and ``flip``, drawn from the
    same generator in the same order as the decoded path, for
    :class:`~simmim.data.gpu_decode.DeviceAugment` to finish on the training device. Other
    files (non-JPEG, EXIF-rotated, CMYK, unreadable) are decoded here as usual.

    Args:
        source: Where the images come from.
        augment: The crop/flip/normalise transform.
        mask_generator: Draws the SimMIM mask; None to return images only.
        seed: The run's seed.
        max_pixels: Refuse (skip) images with more pixels than this.
        encoded: Return JPEG bytes + crop parameters instead of decoded pixels (see above).
    """

    def __init__(
        self,
        source: ImageSource,
        augment: SimMIMAugment,
        mask_generator: MaskGenerator | None,
        seed: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        encoded: bool = False,
    ) -> None:
        if len(source) == 0:
            raise DataError(f"the data source {source!r} holds no images")
        self.source = source
        self.augment = augment
        self.mask_generator = mask_generator
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self.encoded = encoded
        self._warn = _WarnOnce()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws the next iterator uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key`` (an index, or ``(epoch, index)``): ``image`` float32 (3,S,S) (or, when
        ``encoded``, maybe ``jpeg``/``box``/``flip`` instead), ``mask`` uint8 (G,G) if masking,
        ``index`` (the image actually used), ``skipped`` (unreadable images passed over),
        ``epoch`` and ``key_index`` (the index asked for).

        Raises:
            DataError: If 50 images in a row, starting at ``index``, are unreadable.
        """
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self.sample(epoch, index, encoded=self.encoded)

    def sample(self, epoch: int, index: int, encoded: bool = False) -> dict[str, Any]:
        """Sample ``index`` of ``epoch`` (see :meth:`__getitem__`); decoded unless ``encoded``."""
        tries = min(MAX_CONSECUTIVE_UNREADABLE, len(self.source))
        last_error: ImageDecodeError | None = None
        for skipped in range(tries):
            used = (index + skipped) % len(self.source)
            augment_rng, mask_rng = sample_rng(self.seed, epoch, index)
            try:
                data = self.source.read_bytes(used)
                sample: dict[str, Any] = (self._encoded(used, data, augment_rng) if encoded else None) or {
                    "image": self._augmented(used, data, augment_rng)}
            except ImageDecodeError as err:
                self._warn(err)
                last_error = err
                continue
            sample.update(index=used, skipped=skipped, epoch=epoch, key_index=index)
            if self.mask_generator is not None:
                sample["mask"] = torch.from_numpy(self.mask_generator(mask_rng))
            return sample
        raise DataError(
            f"{tries} consecutive unreadable images starting at index {index} "
            f"(last: {last_error}); run `simmim validate-data` on the source to list "
            "every unreadable file, then remove or fix them"
        )

    def _augmented(self, i: int, data: bytes, rng: random.Random) -> torch.Tensor:
        name = self.source.name(i)
        img, box = decode_for_crop(
            data,
            name,
            lambda w, h: self.augment.sample_box(w, h, rng),
            min_side=self.augment.image_size,
            max_pixels=self.max_pixels,
        )
        return self.augment.apply(img, box, rng)

    def _encoded(self, i: int, data: bytes, rng: random.Random) -> dict[str, Any] | None:
        """JPEG bytes + crop box + flip for device decoding; None (nothing drawn from ``rng``)
        when the file must be decoded here (not a plain upright RGB/grayscale JPEG)."""
        img = open_image(data, self.source.name(i), self.max_pixels)
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or exif_orientation(img) != 1:
            return None
        box = self.augment.sample_box(img.width, img.height, rng)
        flip = self.augment.hflip and rng.random() < 0.5
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8), "box": box, "flip": flip}


class ImageListDataset(Dataset[dict[str, Any]]):
    """Every image of a source, deterministically transformed, for embeddings or evaluation.

    An unreadable image yields an all-zero image with ``ok=False`` instead of an error, so
    batch positions keep matching source indices; the caller reports those images.

    Args:
        source: Where the images come from.
        transform: The deterministic resize/crop/normalise transform.
        max_pixels: Treat images with more pixels than this as unreadable.
    """

    def __init__(
        self, source: ImageSource, transform: EvalTransform, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.source = source
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``image`` float32 (3,S,S), ``index`` and ``ok`` (False when unreadable)."""
        try:
            data = self.source.read_bytes(index)
            img, box = decode_for_crop(
                data,
                self.source.name(index),
                self.transform.center_box,
                min_side=self.transform.image_size,
                max_pixels=self.max_pixels,
            )
            image, ok = self.transform.apply(img, box), True
        except ImageDecodeError as err:
            logger.debug("unreadable image %s: %s", err.name, err.reason)
            size = self.transform.image_size
            image, ok = torch.zeros(3, size, size, dtype=torch.float32), False
        return {"image": image, "index": index, "ok": ok}
