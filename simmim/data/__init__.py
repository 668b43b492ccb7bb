"""Data pipeline: image sources, decoding, SimMIM augmentation, sampling and validation.

Names are imported on first use (PEP 562), so ``simmim.data.sources`` (and ``open_source``)
can be used without importing torch: the API reads dataset images for thumbnails that way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simmim.data.dataset import ImageListDataset, PretrainDataset, sample_rng
    from simmim.data.images import DEFAULT_MAX_PIXELS, decode_image, image_size
    from simmim.data.loader import build_pretrain_loader, collate_pretrain, default_num_workers
    from simmim.data.sampler import ResumableSampler
    from simmim.data.sources import (
        IMAGE_EXTENSIONS,
        FolderSource,
        ImageSource,
        ListFileSource,
        TarSource,
        ZipSource,
        open_source,
    )
    from simmim.data.transforms import EvalTransform, SimMIMAugment, sample_crop_box
    from simmim.data.validate import DataReport, validate_source

_MODULES = {
    "dataset": ("ImageListDataset", "PretrainDataset", "sample_rng"),
    "images": ("DEFAULT_MAX_PIXELS", "decode_image", "image_size"),
    "loader": ("build_pretrain_loader", "collate_pretrain", "default_num_workers"),
    "sampler": ("ResumableSampler",),
    "sources": ("IMAGE_EXTENSIONS", "FolderSource", "ImageSource", "ListFileSource", "TarSource", "ZipSource",
                "open_source"),
    "transforms": ("EvalTransform", "SimMIMAugment", "sample_crop_box"),
    "validate": ("DataReport", "validate_source"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DataReport",
    "EvalTransform",
    "FolderSource",
    "ImageListDataset",
    "ImageSource",
    "ListFileSource",
    "PretrainDataset",
    "ResumableSampler",
    "SimMIMAugment",
    "TarSource",
    "ZipSource",
    "build_pretrain_loader",
    "collate_pretrain",
    "decode_image",
    "default_num_workers",
    "image_size",
    "open_source",
    "sample_crop_box",
    "sample_rng",
    "validate_source",
]
