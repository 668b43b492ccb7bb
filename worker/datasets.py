"""Dataset locations as workers see them, and a quick readability check before training."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simmim.errors import DataError

if TYPE_CHECKING:
    from simmim.data import ImageSource

REMOTE_DATASET_SCHEMES = ("http://", "https://", "s3://")
SAMPLE_IMAGES = 16
"""Images decoded up front to catch a dataset of unreadable files before training starts."""


def local_dataset_path(location: str) -> Path:
    """The local path of a dataset location (``file://`` or plain path).

    Raises:
        DataError: For http(s) archives and s3 locations, which workers do not fetch yet.
    """
    if location.startswith(REMOTE_DATASET_SCHEMES):
        raise DataError(f"{location}: remote datasets (http(s) archives, s3://) are not supported by the "
                        "workers yet; put the images on a path the workers can read")
    return Path(location.removeprefix("file://"))


def check_sample(source: ImageSource, max_pixels: int, count: int = SAMPLE_IMAGES) -> None:
    """Decode the first ``count`` images; fail when none of them is readable.

    Raises:
        DataError: Every sampled image is unreadable, with the first reason.
    """
    from simmim.data import decode_image
    from simmim.errors import ImageDecodeError

    reasons = []
    for i in range(min(count, len(source))):
        try:
            decode_image(source.read_bytes(i), source.name(i), max_pixels)
            return
        except ImageDecodeError as err:
            reasons.append(f"{err.name}: {err.reason}")
    raise DataError(f"none of the first {len(reasons)} images of the dataset could be decoded "
                    f"(e.g. {reasons[0]}); check that it holds valid image files")
