"""Data pipeline: image sources, decoding, SimMIM augmentation, sampling and validation."""

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
