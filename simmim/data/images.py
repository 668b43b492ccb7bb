"""Decode encoded image bytes into upright RGB PIL images, failing with a human reason.

Every failure (empty file, not an image, truncated data, too many pixels) becomes an
:class:`~simmim.errors.ImageDecodeError` so callers handle one exception type. The pixel
count is checked from the header before any pixel is decoded, so a hostile or absurd file
cannot exhaust memory.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from simmim.errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 178_956_970
"""Same as Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``), which applies on top."""

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in pixels; may be fractional."""

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the image upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255)


def open_image(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse only the header of an encoded image and check its pixel count.

    Args:
        data: The encoded file.
        name: Shown in errors.
        max_pixels: Refuse images with more pixels than this (None: only Pillow's limit).

    Returns:
        A lazy PIL image: size, format and metadata are known, pixels are not decoded yet.

    Raises:
        ImageDecodeError: If the data is empty, not a recognised image, or too large.
    """
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)):,} pixels" if found else str(err)
        raise ImageDecodeError(name, f"too many pixels: {pixels} is over Pillow's limit") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(name, "not an image (unrecognised file format)") from err
    except Exception as err:  # Pillow plugins raise many types on malformed headers
        raise ImageDecodeError(name, f"corrupt or truncated image header ({err})") from err
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(name, f"too many pixels: {width}x{height} > {max_pixels:,}")
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of a lazily opened image, 1 when absent or unreadable.

    Only formats that keep EXIF in their header are asked, because asking some others
    (PNG) would decode the pixels as a side effect.
    """
    if img.format not in ("JPEG", "MPO", "WEBP", "TIFF") and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF must not make a good image unusable
        return 1
    return value if value in _UPRIGHT else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) the image will have once EXIF orientation is applied."""
    width, height = img.size
    return (height, width) if exif_orientation(img) in (5, 6, 7, 8) else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, palette or grayscale with a transparent colour) is composited
    on white, which is what a viewer shows and avoids black fringes. 16/32-bit and float
    grayscale is rescaled to 0-255 instead of clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """Rescale 16/32-bit or float grayscale to 0-255 by the range its type implies."""
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if is_float and low >= 0 and high <= 1.0:
        full_scale = 1.0
    elif is_float and low >= 0 and high <= 255:
        full_scale = 255.0
    elif not is_float and low >= 0 and high <= 65535:  # how Pillow reads 16-bit PNG/TIFF
        full_scale = 65535.0
    else:  # signed, 32-bit or unusual float data: stretch its actual range
        values, full_scale = values - low, max(high - low, 1e-12)
    return np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def finish_image(img: Image.Image, name: str) -> Image.Image:
    """Decode the pixels of a lazily opened image, make it upright and RGB.

    Raises:
        ImageDecodeError: If the pixel data is truncated or corrupt.
    """
    orientation = exif_orientation(img)
    try:
        img.load()
        if orientation in _UPRIGHT:
            img = img.transpose(_UPRIGHT[orientation])
        return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(name, f"too many pixels: {err}") from err
    except OSError as err:
        reason = str(err) or type(err).__name__
        raise ImageDecodeError(name, f"corrupt or truncated image data ({reason})") from err
    except Exception as err:  # Pillow decoders raise assorted types on corrupt data
        raise ImageDecodeError(name, f"cannot decode image: {err or type(err).__name__}") from err


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an encoded image into an upright RGB PIL image.

    Args:
        data: The encoded file (any format Pillow reads).
        name: Shown in errors.
        max_pixels: Refuse images with more pixels than this, checked before decoding.

    Raises:
        ImageDecodeError: On any failure, with a short human reason.
    """
    return finish_image(open_image(data, name, max_pixels), name)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied), from the header only.

    Raises:
        ImageDecodeError: If the header cannot be parsed.
    """
    return oriented_size(open_image(data, name, max_pixels=None))


def decode_for_crop(
    data: bytes,
    name: str,
    choose_box: Callable[[int, int], Box],
    min_side: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, Box]:
    """Decode an image for one crop, letting libjpeg shrink large JPEGs while decoding.

    ``choose_box`` gets the upright (width, height) and returns the crop box. For a JPEG,
    the crop is known before decoding, so the image is decoded at 1/2, 1/4 or 1/8 scale
    (``Image.draft``) when the crop still has at least ``min_side`` pixels per side at that
    scale, and the box is rescaled to match. Other formats are decoded in full.

    Returns:
        The upright RGB image and the crop box in its pixel coordinates.

    Raises:
        ImageDecodeError: On any decoding failure.
    """
    img = open_image(data, name, max_pixels)
    if img.format != "JPEG":
        img = finish_image(img, name)
        return img, choose_box(*img.size)
    full_size = oriented_size(img)
    box = choose_box(*full_size)
    reduction = _draft_reduction(box, min_side)
    if reduction > 1:
        img.draft("RGB", (img.width // reduction, img.height // reduction))
    img = finish_image(img, name)
    if img.size == full_size:
        return img, box
    sx, sy = img.width / full_size[0], img.height / full_size[1]
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _draft_reduction(box: Box, min_side: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2 or 1) keeping the crop at least ``min_side`` wide."""
    crop_side = min(box[2] - box[0], box[3] - box[1])
    return next((r for r in (8, 4, 2) if crop_side / r >= min_side), 1)
