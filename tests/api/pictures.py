"""Image bytes for embedding tests: real tiny PNGs and a hand-made PNG header claiming a huge size."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(size: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real, decodable PNG."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose IHDR claims ``width x height`` RGB pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))
