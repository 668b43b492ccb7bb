"""Checks on uploaded images before any worker sees them: count, bytes, format and pixel count.

Only the image header is read (PIL opens lazily and reports the size without decoding), so a
100000 x 100000 PNG of a few hundred bytes is refused in microseconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from api.errors import PayloadTooLarge, Unprocessable, validation_detail
from api.schemas.embeddings import EmbeddingForm

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
"""Formats the API accepts (no plugins that shell out, such as EPS)."""


@dataclass(frozen=True)
class UploadedImage:
    """One image of an embedding request: where it came from and its bytes."""

    field: str
    name: str | None
    data: bytes


@dataclass(frozen=True)
class EmbeddingInput:
    """Checked images plus the options that go with them."""

    images: list[UploadedImage]
    form: EmbeddingForm


@dataclass(frozen=True)
class ImageLimits:
    max_images: int
    max_bytes: int
    max_pixels: int


def decode_base64(items: list[str]) -> list[bytes]:
    """Decode every item or raise one 422 naming each bad index."""
    decoded, problems = [], []
    for i, text in enumerate(items):
        try:
            decoded.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as err:
            problems.append({"field": f"images[{i}]", "message": f"not valid base64: {err}"})
    if problems:
        raise Unprocessable(validation_detail(problems), errors=problems)
    return decoded


def check_counts(count: int, total_bytes: int, limits: ImageLimits) -> None:
    """413 when there are too many images or too many bytes in one request."""
    if count > limits.max_images:
        raise PayloadTooLarge(f"{count} images in one request; the limit is {limits.max_images}. "
                              "Split the request, or use an embedding run for whole datasets.")
    if total_bytes > limits.max_bytes:
        raise PayloadTooLarge(f"the images total {total_bytes} bytes; the limit is {limits.max_bytes} "
                              "per request")


def image_problem(data: bytes, max_pixels: int) -> str | None:
    """Why ``data`` is not an acceptable image, or None. Reads the header only."""
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                width, height = im.size
    except Image.DecompressionBombError as err:
        return f"image is too large (decompression bomb?): {err}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return f"not a readable image; accepted formats: {', '.join(FORMATS)}"
    if width * height > max_pixels:
        return (f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
                "(decompression bomb guard)")
    return None


def check_images(images: list[UploadedImage], limits: ImageLimits) -> None:
    """Every limit at once: 413 for count/bytes, then one 422 listing every unreadable image."""
    check_counts(len(images), sum(len(im.data) for im in images), limits)
    problems = []
    for im in images:
        problem = image_problem(im.data, limits.max_pixels)
        if problem is not None:
            label = f" ({im.name})" if im.name else ""
            problems.append({"field": im.field, "message": f"{problem}{label}"})
    if problems:
        raise Unprocessable(validation_detail(problems), errors=problems)
