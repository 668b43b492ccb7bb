"""Hostile datasets, crafted for real: zip-slip and absolute names, links out of the archive,
a zip bomb, a lying zip header, an oversized tar member, a hostile pax header, a PNG claiming
10^10 pixels and truncated archives. Each one is refused (DataError / ImageDecodeError with a
reason) or skipped and counted; nothing is ever written outside (or inside) any directory,
and no read holds more than a few MiB however much the archive claims to hold.
"""

from __future__ import annotations

import io
import logging
import stat
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from simmim.data import decode_image, open_source
from simmim.data.archives import DEFAULT_MAX_MEMBER_BYTES, TarSource, ZipSource, unsafe_member_name
from simmim.errors import DataError, ImageDecodeError

MiB = 1024 * 1024


def png_bytes(seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose IHDR declares ``width x height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (to prove that nothing was written)."""
    return {str(p.relative_to(root)): (p.lstat().st_size if not p.is_dir() else -1) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/work/data`` for the archives; afterwards nothing new exists anywhere under
    ``tmp_path`` except what the test itself wrote into ``data``."""
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    yield data
    outside = {p for p in tree(tmp_path) if not p.startswith("work/data")}
    assert outside == {"work"}, f"something was written outside the data folder: {outside}"


def read_everything(source: TarSource | ZipSource) -> list[str]:
    """Read and try to decode every listed member; the reasons of the failures."""
    reasons = []
    for i in range(len(source)):
        try:
            decode_image(source.read_bytes(i), source.name(i))
        except ImageDecodeError as err:
            reasons.append(err.reason)
    return reasons


@pytest.fixture(autouse=True)
def _count_bad_input(request: pytest.FixtureRequest, record_property: Callable[[str, Any], None]) -> None:
    """For bench/faults.py: every test here but the honest round trip feeds one hostile input."""
    if "honest" not in request.node.name:
        record_property("bad_inputs", 1)


def test_unsafe_member_names() -> None:
    for name in ("../x.png", "a/../../x.png", "..\\..\\x.png", "/etc/x.png", "\\x.png", "C:\\x.png",
                 "c:/x.png", "a\x00.png"):
        assert unsafe_member_name(name) is not None, name
    for name in ("a.png", "a/b/c.png", "a..b.png", "..a/b.png", "./a.png"):
        assert unsafe_member_name(name) is None, name


def test_zip_slip_absolute_and_link_members_are_skipped_and_counted(
        sandbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = sandbox / "hostile.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("good/a.png", png_bytes(1))
        for name in ("/tmp/abs_evil.png", "../../evil.png", "good/../../../evil2.png", "..\\..\\evil3.png",
                     "C:\\Windows\\evil.png"):
            archive.writestr(name, png_bytes(2))
        link = zipfile.ZipInfo("good/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # what `zip --symlinks` writes
        archive.writestr(link, "/etc/passwd")
        archive.writestr("good/b.png", png_bytes(3))
    before = tree(sandbox)
    with caplog.at_level(logging.WARNING, logger="simmim.data.archives"):
        source = open_source(path)
    assert isinstance(source, ZipSource)
    assert [source.name(i) for i in range(len(source))] == ["good/a.png", "good/b.png"]
    assert source.skipped == {"unsafe_name": 5, "link": 1}
    assert "'..' in path" in source.skip_summary() and "absolute path" in source.skip_summary()
    assert "skipped 6 archive member(s)" in caplog.text and "symlinks or hardlinks" in caplog.text
    assert read_everything(source) == []
    assert tree(sandbox) == before


def test_tar_links_devices_and_unsafe_names_are_skipped(sandbox: Path) -> None:
    path = sandbox / "hostile.tar"
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes = b"", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("ok/a.png", png_bytes(1))
        add("ok/sym.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("ok/sym2.png", type=tarfile.SYMTYPE, linkname="../../../../outside.png")
        add("ok/hard.png", type=tarfile.LNKTYPE, linkname="/etc/shadow")
        add("ok/fifo.png", type=tarfile.FIFOTYPE)
        add("ok/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("/abs/evil.png", png_bytes(2))
        add("../../slip.png", png_bytes(3))
        add("ok/b.png", png_bytes(4))
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert "/abs/evil.png" in names and "../../slip.png" in names  # the archive really holds them
    source = open_source(path)
    assert isinstance(source, TarSource)
    assert [source.name(i) for i in range(len(source))] == ["ok/a.png", "ok/b.png"]
    assert source.skipped == {"link": 3, "special": 2, "unsafe_name": 2}
    assert "-> '/etc/passwd'" in source.skip_summary()
    assert read_everything(source) == []


def write_zeros_member(path: Path, name: str, size: int, method: int = zipfile.ZIP_DEFLATED) -> None:
    """A zip holding ``size`` zero bytes under ``name``, written in 1 MiB steps (cheap in memory)."""
    zeros = bytes(MiB)
    with zipfile.ZipFile(path, "w", compression=method, compresslevel=9) as archive:
        archive.writestr("fine.png", png_bytes())
        with archive.open(name, "w") as member:
            for _ in range(size // MiB):
                member.write(zeros)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 MiB of zeros deflated to ~200 KiB, named like an image."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    write_zeros_member(path, "bomb.png", 200 * MiB)
    assert path.stat().st_size < 400_000
    return path


def test_zip_bomb_is_skipped_before_decompression(zip_bomb: Path) -> None:
    tracemalloc.start()
    try:
        source = open_source(zip_bomb)  # default limit (256 MiB): the ratio gives it away
        read_everything(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(source, ZipSource) and source.max_member_bytes == DEFAULT_MAX_MEMBER_BYTES
    assert [source.name(i) for i in range(len(source))] == ["fine.png"]
    assert source.skipped == {"ratio": 1}
    assert "209,715,200" in source.skip_summary() and "zip bomb" in source.skip_summary()
    assert peak < 8 * MiB, f"peak {peak:,} bytes"

    small = open_source(zip_bomb, max_member_bytes=MiB)  # and the size limit, on its own
    assert isinstance(small, ZipSource) and small.skipped == {"too_large": 1}
    assert "209,715,200 bytes > limit of 1,048,576" in small.skip_summary()


def test_only_a_bomb_is_a_clear_data_error(tmp_path: Path) -> None:
    path = tmp_path / "only.zip"
    zeros = bytes(MiB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("bomb.png", "w") as member:
        for _ in range(20):
            member.write(zeros)
    with pytest.raises(DataError, match=r"no images found in .*skipped archive members: 1 compressed "
                                        r"suspiciously well \(zip bomb\)"):
        open_source(path)


def lie_about_size(path: Path, name: str, declared: int) -> None:
    """Rewrite the central directory entry of ``name`` to declare ``declared`` bytes."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + name_len]) == encoded:
            break
        at += 4
    struct.pack_into("<I", data, at + 24, declared)  # uncompressed size
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_STORED])
def test_a_lying_zip_header_is_cut_off_at_its_declared_size(tmp_path: Path, method: int) -> None:
    """The central directory says 4 KiB; the data expands to 64 MiB (bzip2: ~1 million to 1)."""
    path = tmp_path / "liar.zip"
    write_zeros_member(path, "liar.png", 4 * MiB if method == zipfile.ZIP_STORED else 64 * MiB, method)
    lie_about_size(path, "liar.png", 4096)
    source = open_source(path)
    assert isinstance(source, ZipSource) and len(source) == 2 and source.skipped == {}
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="expands past the 4,096 bytes its header declares"):
            source.read_bytes(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    dictionary = 8 * MiB if method == zipfile.ZIP_LZMA else 0  # the LZMA decoder's window (preset 6)
    assert peak < 2 * MiB + dictionary, f"peak {peak:,} bytes"
    assert decode_image(source.read_bytes(0), "fine.png").size == (8, 8)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_STORED])
def test_honest_members_of_every_zip_method_read_back(tmp_path: Path, method: int) -> None:
    path = tmp_path / "ok.zip"
    images = {f"img{i}.png": png_bytes(i) for i in range(3)}
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in images.items():
            archive.writestr(name, data)
    source = open_source(path)
    assert {source.name(i): source.read_bytes(i) for i in range(len(source))} == images


def test_corrupted_zip_member_data_fails_its_crc(tmp_path: Path) -> None:
    path = tmp_path / "flipped.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", png_bytes(1))
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # inside the stored member's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="CRC mismatch"):
        open_source(path).read_bytes(0)


def test_oversized_tar_member_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("a.png", png_bytes(1)), ("huge.png", bytes(3 * MiB)), ("b.png", png_bytes(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = open_source(path, max_member_bytes=MiB)
    assert [source.name(i) for i in range(len(source))] == ["a.png", "b.png"]
    assert isinstance(source, TarSource) and source.skipped == {"too_large": 1}
    assert "'huge.png': 3,145,728 bytes > limit of 1,048,576" in source.skip_summary()
    assert read_everything(source) == []


def pax_header_claiming(size: int) -> bytes:
    """One 512-byte tar header of type 'x' (pax extended header) that declares ``size`` bytes."""
    header = bytearray(512)
    header[0:9] = b"PaxHeader"
    header[100:108] = b"0000644\x00"
    header[108:116] = header[116:124] = b"0000000\x00"
    header[124:136] = f"{size:011o}".encode() + b"\x00"
    header[136:148] = b"00000000000\x00"
    header[156:157] = b"x"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\x00 "
    return bytes(header)


@pytest.mark.parametrize("compressed", [False, True])
def test_a_pax_header_claiming_gigabytes_refuses_the_archive(tmp_path: Path, compressed: bool) -> None:
    raw = pax_header_claiming(8 * 1024 ** 3) + bytes(4096)
    path = tmp_path / ("pax.tar.gz" if compressed else "pax.tar")
    if compressed:
        import gzip
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    with pytest.raises(DataError, match=r"refusing tar archive .*8,589,934,592 bytes"):
        open_source(path)


def test_decompression_bomb_png_in_an_archive_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "pngbomb.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bomb.png", png_claiming(100_000, 100_000))
        archive.writestr("wide.png", png_claiming(30_000, 30_000))
        archive.writestr("ok.png", png_bytes())
    source = open_source(path)
    assert len(source) == 3  # tiny files: the archive layer has nothing against them
    tracemalloc.start()
    try:
        reasons = read_everything(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(reasons) == 2 and all("too many pixels" in r for r in reasons), reasons
    assert "10,000,000,000 pixels" in reasons[0] and "900,000,000 pixels" in reasons[1]
    assert peak < 4 * MiB


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_truncated_archives_are_refused_with_a_reason(tmp_path: Path, kind: str) -> None:
    whole = tmp_path / f"whole.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(whole, "w") as archive:
            for i in range(4):
                archive.writestr(f"{i}.png", png_bytes(i) + bytes(3000))
    else:
        mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind]
        with tarfile.open(whole, mode) as tar:
            for i in range(4):
                data = png_bytes(i) + bytes(3000)
                info = tarfile.TarInfo(f"{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cannot read (zip|tar) archive .*cut\.") as info:
        open_source(cut)
    assert "complete" in str(info.value)


def test_an_lzma_member_declaring_a_huge_dictionary_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dict.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as archive:
        archive.writestr("a.png", png_bytes())
    data = bytearray(path.read_bytes())
    props_at = 30 + len("a.png") + 4  # local header, name, no extra; version + props size
    struct.pack_into("<I", data, props_at + 1, 1 << 30)  # a 1 GiB window
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="LZMA dictionary of 1,073,741,824 bytes"):
        open_source(path).read_bytes(0)
