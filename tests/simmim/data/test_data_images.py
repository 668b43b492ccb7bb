"""Decoding: orientation, colour modes, failures with reasons, pixel limits, JPEG draft."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile

from simmim.data.images import decode_for_crop, decode_image, image_size
from simmim.errors import ImageDecodeError

Encode = Callable[..., bytes]
MakeImage = Callable[..., Image.Image]


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, width // 2, height))
    return img


def _rotated_jpeg(encode: Encode, width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(_halves(width, height), "JPEG", quality=95, exif=exif.tobytes())


def _close(pixel: tuple[int, ...], expected: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def test_exif_orientation_is_applied(encode: Encode) -> None:
    # Orientation 6: the stored image must be turned 90 degrees clockwise to be upright,
    # so the stored left (red) half ends up on top.
    data = _rotated_jpeg(encode, 40, 20, orientation=6)
    assert image_size(data, "rotated.jpg") == (20, 40)
    img = decode_image(data, "rotated.jpg")
    assert img.size == (20, 40)
    assert _close(img.getpixel((10, 5)), (255, 0, 0))
    assert _close(img.getpixel((10, 35)), (0, 0, 255))


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    return img


def _sixteen_bit() -> Image.Image:
    values = np.full((8, 8), 65535, dtype=np.uint16)
    values[0, 0] = 0
    return Image.fromarray(values)


@pytest.mark.parametrize(
    "img, fmt, corner, middle",
    [
        (Image.new("L", (8, 8), 100), "PNG", (100, 100, 100), (100, 100, 100)),
        (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255), (255, 255, 255)),
        (Image.new("RGB", (8, 8), (255, 0, 0)).convert("P"), "PNG", (255, 0, 0), (255, 0, 0)),
        (_palette_with_transparency(), "PNG", (255, 0, 0), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG", (255, 255, 255), (255, 255, 255)),
        (Image.new("LA", (8, 8), (0, 255)), "PNG", (0, 0, 0), (0, 0, 0)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0), (255, 0, 0)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF", (255, 0, 0), (255, 0, 0)),
        (_sixteen_bit(), "PNG", (0, 0, 0), (255, 255, 255)),
        (Image.new("RGB", (8, 8), (0, 255, 0)), "WEBP", (0, 255, 0), (0, 255, 0)),
    ],
    ids=["L", "1", "P", "P+transparency", "RGBA", "LA", "CMYK-jpeg", "CMYK-tiff", "16bit", "webp"],
)
def test_every_mode_becomes_rgb(
    encode: Encode,
    img: Image.Image,
    fmt: str,
    corner: tuple[int, int, int],
    middle: tuple[int, int, int],
) -> None:
    out = decode_image(encode(img, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB"
    assert out.size == (8, 8)
    assert _close(out.getpixel((0, 0)), corner), out.getpixel((0, 0))
    assert _close(out.getpixel((4, 4)), middle), out.getpixel((4, 4))


def test_failures_become_decode_errors_with_reasons(encode: Encode, make_image: MakeImage) -> None:
    jpeg = encode(make_image(128, 128), "JPEG")
    cases = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "header-cut.jpg": (jpeg[:300], "truncated"),
        "notes.jpg": (b"these are my holiday notes, not a photo\n" * 4, "not an image"),
        "empty.png": (b"", "empty"),
    }
    for name, (data, reason) in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, name)
        assert info.value.name == name
        assert reason in info.value.reason.lower()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a size its (tiny) pixel data does not have."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixels fail loudly."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_decoding")
def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(ImageDecodeError, match=r"too many pixels: 5000x5000 > 1,000,000"):
        decode_image(_png_header_only(5000, 5000), "big.png", max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(_png_header_only(100_000, 100_000), "bomb.png")


@pytest.mark.usefixtures("no_decoding")
def test_image_size_reads_only_the_header() -> None:
    assert image_size(_png_header_only(5000, 3000), "big.png") == (5000, 3000)


def test_large_jpeg_is_decoded_at_reduced_scale(encode: Encode) -> None:
    data = _rotated_jpeg(encode, 800, 400, orientation=6)  # upright: 400 x 800
    seen: list[tuple[int, int]] = []

    def whole(width: int, height: int) -> tuple[float, float, float, float]:
        seen.append((width, height))
        return (0.0, 0.0, float(width), float(height))

    img, box = decode_for_crop(data, "big.jpg", whole, min_side=32)
    assert seen == [(400, 800)]
    assert img.size == (50, 100)  # 1/8 scale: the 400 px crop side is still >= 32 px
    assert box == (0.0, 0.0, 50.0, 100.0)
    assert _close(img.getpixel((25, 10)), (255, 0, 0), tol=40)

    img, box = decode_for_crop(data, "big.jpg", whole, min_side=300)
    assert img.size == (400, 800)  # 1/2 scale would leave a 200 px crop side: no draft
    assert box == (0.0, 0.0, 400.0, 800.0)
