"""Tar and zip archives as image sources, read member by member without extracting.

Nothing is ever extracted to disk: a member's bytes are read into memory when the sample is
needed. Hostile archives are handled as data, never as paths:

* members that are links (symlinks, hardlinks), devices or FIFOs are skipped;
* members whose name is absolute (``/x.png``, ``C:\\x.png``) or holds ``..`` are skipped;
* members whose decompressed size (as the archive declares it) is over ``max_member_bytes``
  are skipped before a byte of them is decompressed, and so are zip members larger than
  ``RATIO_FLOOR_BYTES`` compressed more than ``max_ratio`` times (zip bombs);
* zip members are decompressed by this module in bounded steps, so a member whose header
  lies about its size is cut off at the declared size (and then fails its CRC) instead of
  filling memory; tar headers larger than ``max_member_bytes`` (pax, GNU long names) refuse
  the archive.

Every skipped member is counted by reason in ``source.skipped`` (examples of names in
``source.skipped_examples``) and logged once per archive; ``skip_summary()`` says it in words.

An open file handle cannot be shared between processes (a forked DataLoader worker would
move the parent's file offset under it), so each source remembers which process opened
its handle and opens a fresh one the first time it is used in another process.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import os
import re
import stat
import struct
import tarfile
import threading
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from simmim.data.filenames import is_image_member
from simmim.errors import DataError, ImageDecodeError

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)

DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
"""Largest decompressed member read from an archive (the service passes its
``max_archive_member_bytes`` setting; this is the same default)."""
DEFAULT_MAX_RATIO = 100.0
"""Zip members bigger than ``RATIO_FLOOR_BYTES`` that expand more than this are skipped.
Encoded images barely compress (JPEG/PNG ~1x, even raw BMP rarely 20x); 1000x is a bomb."""
RATIO_FLOOR_BYTES = 8 * 1024 * 1024
"""Below this decompressed size the ratio is not checked: decompressing it costs nothing."""
_CHUNK = 64 * 1024
_MAX_LZMA_DICT = 64 * 1024 * 1024
"""The decoder allocates the dictionary the stream declares up front; presets use at most 64 MiB."""

SKIP_REASONS = {
    "link": "symlinks or hardlinks",
    "special": "devices, FIFOs or sparse files",
    "unsafe_name": "absolute or '..' names",
    "too_large": "over the size limit",
    "ratio": "compressed suspiciously well (zip bomb)",
    "encrypted": "encrypted",
    "unsupported": "using an unsupported compression method",
}
"""Why a member was skipped -> how ``skip_summary`` says it."""
_EXAMPLES = 3

# Guards the "first use in a new process" reset; replaced in a forked child because a
# lock copied while another thread held it would stay locked forever.
_reset_guard = threading.Lock()


def _fresh_reset_guard() -> None:
    global _reset_guard
    _reset_guard = threading.Lock()


os.register_at_fork(after_in_child=_fresh_reset_guard)

_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_member_name(name: str) -> str | None:
    """Why an archive member name must not be used as a relative path, or None when it is fine.

    Backslashes count as separators (zips written on Windows use them), so ``..\\x`` is caught.
    """
    if "\x00" in name:
        return "NUL byte in name"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        return "absolute path"
    if ".." in posix.split("/"):
        return "'..' in path"
    return None


class _ArchiveSource:
    """Shared per-process handle management and skip accounting for archive sources.

    Subclasses fill ``self._names`` in ``__init__`` and implement ``_open`` and ``_read``.
    Reads are serialised with a lock so one source can also be used from a thread pool.
    """

    def __init__(self, path: str | Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        if max_member_bytes < 1:
            raise ValueError(f"max_member_bytes must be at least 1, got {max_member_bytes}")
        self.path = Path(path)
        self.max_member_bytes = max_member_bytes
        self.skipped: Counter[str] = Counter()
        self.skipped_examples: dict[str, list[str]] = {}
        self._names: list[str] = []
        self._handle: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        """Member path inside the archive."""
        return self._names[i]

    def read_bytes(self, i: int) -> bytes:
        """Read member ``i``; raises ImageDecodeError if the archive cannot be read there."""
        name = self._names[i]
        self._reset_if_forked()
        with self._lock:
            try:
                if self._handle is None:
                    self._handle = self._open()
                return self._read(self._handle, i)
            except ImageDecodeError:
                raise
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, RuntimeError, lzma.LZMAError,
                    zlib.error) as err:
                raise ImageDecodeError(name, f"cannot read from {self.path.name}: {err}") from err

    def skip_summary(self) -> str:
        """The skipped members in words ('' when none), e.g. ``2 symlinks or hardlinks (a.png, b.png)``."""
        parts = []
        for reason, count in sorted(self.skipped.items()):
            examples = ", ".join(self.skipped_examples.get(reason, []))
            parts.append(f"{count} {SKIP_REASONS.get(reason, reason)} ({examples}{', ...' if count > _EXAMPLES else ''})")
        return "; ".join(parts)

    def _skip(self, reason: str, name: str, why: str = "") -> None:
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(f"{name!r}{': ' + why if why else ''}")

    def _log_skipped(self) -> None:
        if self.skipped:
            logger.warning("%s: skipped %d archive member(s): %s", self.path, sum(self.skipped.values()),
                           self.skip_summary())

    def _too_large(self, size: int) -> str | None:
        if size > self.max_member_bytes:
            return f"{size:,} bytes > limit of {self.max_member_bytes:,}"
        return None

    def close(self) -> None:
        """Close this process's handle (it is reopened on the next read)."""
        with self._lock:
            self._close_handle()

    def __del__(self) -> None:
        self._close_handle()

    def _reset_if_forked(self) -> None:
        if self._pid == os.getpid():
            return
        with _reset_guard:
            if self._pid != os.getpid():
                self._close_handle()  # closes only this process's copy of the descriptor
                self._lock = threading.Lock()
                self._pid = os.getpid()

    def _close_handle(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()

    def _open(self) -> Any:
        raise NotImplementedError

    def _read(self, handle: Any, i: int) -> bytes:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # Handles and locks cannot be pickled (spawned DataLoader workers pickle the dataset).
        state = self.__dict__.copy()
        state.update(_handle=None, _lock=None, _pid=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, images={len(self)})"


_TAR_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"))


class _Stream(Protocol):
    """What a tar source needs from an (optionally decompressing) file object."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...
    def read(self, size: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


def _open_tar_stream(path: Path, compression: str | None) -> _Stream:
    """Open the tar's byte stream, decompressing on the fly (reads are bounded by their size)."""
    if compression == "gzip":
        return gzip.GzipFile(path, "rb")
    if compression == "bz2":
        return bz2.BZ2File(path, "rb")
    if compression == "xz":
        return lzma.LZMAFile(path, "rb")
    return open(path, "rb")


def _tar_compression(path: Path) -> str | None:
    """The compression of a tar file, read from its magic bytes (None when uncompressed)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _TAR_MAGIC if head.startswith(magic)), None)


class _OversizedRead(Exception):
    """tarfile asked for more bytes at once than a member may have (a hostile pax/GNU header)."""


class _CappedReads:
    """A stream for ``tarfile`` that refuses any single read over ``cap`` bytes.

    While listing, tarfile reads only headers (512 bytes) and the bodies of pax / GNU
    long-name headers, which it loads whole; this stops a header that declares gigabytes
    (which a compressed tar can expand to) from being loaded into memory.
    """

    def __init__(self, stream: _Stream, cap: int) -> None:
        self._stream = stream
        self._cap = cap

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._cap:
            raise _OversizedRead(f"a header asks to read {size:,} bytes at once, over the limit of "
                                 f"{self._cap:,} bytes")
        return self._stream.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def close(self) -> None:
        self._stream.close()


class TarSource(_ArchiveSource):
    """Images inside a .tar (optionally gzip/bz2/xz compressed) archive.

    The index keeps each member's data offset and size, so a read is one seek and one read
    in the (decompressed) stream. Seeking backwards in a compressed stream restarts
    decompression from the start, so random access into .tar.gz is slow: it works, but
    for training use an uncompressed .tar.

    Only regular files with safe relative names and at most ``max_member_bytes`` bytes are
    listed; links, devices, sparse files, absolute or ``..`` names and oversized members
    are skipped and counted in ``skipped``.

    Args:
        path: The archive file.
        max_member_bytes: Largest member to list (its size is read from its header).

    Raises:
        DataError: If the file is not a readable, complete tar archive.
    """

    def __init__(self, path: str | Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        super().__init__(path, max_member_bytes)
        self._spans: list[tuple[int, int]] = []
        try:
            self.compression = _tar_compression(self.path)
            with contextlib.closing(_open_tar_stream(self.path, self.compression)) as stream, \
                    tarfile.open(fileobj=_CappedReads(stream, max(max_member_bytes, 1 << 20)),  # type: ignore[call-overload]
                                 mode="r:") as tar:
                for member in tar:
                    self._index(member)
        except _OversizedRead as err:
            raise DataError(f"refusing tar archive {self.path}: {err}; the archive is corrupt or hostile") from None
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as err:
            raise DataError(
                f"cannot read tar archive {self.path}: {err}; check that the file is a complete "
                "tar archive (list it with `tar tf`)"
            ) from err
        self._log_skipped()
        if self.compression is not None and self._names:
            logger.warning(
                "%s is %s-compressed: random access is slow; for training, repack it as an "
                "uncompressed .tar",
                self.path,
                self.compression,
            )

    def _index(self, member: tarfile.TarInfo) -> None:
        name = member.name
        if member.issym() or member.islnk():
            self._skip("link", name, f"-> {member.linkname!r}")
            return
        if member.isdir():
            return
        if not member.isreg() or member.issparse():
            self._skip("special", name)
            return
        unsafe = unsafe_member_name(name)
        if unsafe is not None:
            self._skip("unsafe_name", name, unsafe)
            return
        if not is_image_member(name):
            return
        too_large = self._too_large(member.size)
        if too_large is not None:
            self._skip("too_large", name, too_large)
            return
        self._names.append(name)
        self._spans.append((member.offset_data, member.size))

    def _open(self) -> _Stream:
        return _open_tar_stream(self.path, self.compression)

    def _read(self, handle: _Stream, i: int) -> bytes:
        offset, size = self._spans[i]
        if size > self.max_member_bytes:  # the limit was lowered after indexing
            raise ImageDecodeError(self._names[i], f"member is too large: {self._too_large(size)}")
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise ImageDecodeError(
                self._names[i], f"archive member is cut short ({len(data)} of {size} bytes)"
            )
        return data


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Stored:
    """The "decompressor" of a stored member: bytes pass through (never more than asked)."""

    def __init__(self) -> None:
        self._pending = b""
        self.eof = False

    @property
    def needs_input(self) -> bool:
        return not self._pending

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        self._pending += data
        out, self._pending = self._pending[:max_length], self._pending[max_length:]
        return out


class _Inflate:
    """zlib's raw inflate behind the bz2/lzma decompressor interface (``needs_input``, ``eof``)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def needs_input(self) -> bool:
        return not self._z.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._z.decompress(self._z.unconsumed_tail + data, max(max_length, 1))


def _lzma_decompressor(read: Any) -> _Decompressor:
    """Zip's LZMA: a 4-byte header (version, properties size), the properties, a raw LZMA1 stream."""
    header = read(4)
    if len(header) != 4:
        raise EOFError("truncated LZMA header")
    (props_size,) = struct.unpack("<H", header[2:])
    props = read(props_size)
    if len(props) >= 5 and struct.unpack("<I", props[1:5])[0] > _MAX_LZMA_DICT:
        raise ValueError(f"LZMA dictionary of {struct.unpack('<I', props[1:5])[0]:,} bytes is over the "
                         f"{_MAX_LZMA_DICT:,} bytes any xz/7z preset uses")
    decode = lzma._decode_filter_properties  # type: ignore[attr-defined]  # what zipfile itself uses
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[decode(lzma.FILTER_LZMA1, props)])


class ZipSource(_ArchiveSource):
    """Images inside a .zip archive, decompressed member by member on read, in bounded steps.

    The central directory gives each member's sizes: members over ``max_member_bytes``, and
    members over ``RATIO_FLOOR_BYTES`` that expand more than ``max_ratio`` times, are skipped
    at once. A read never produces more than the declared size (a lying header makes the
    member fail its CRC instead of exhausting memory). Links, encrypted members, unsupported
    compression methods and absolute or ``..`` names are skipped too; all are counted in
    ``skipped``.

    Args:
        path: The archive file.
        max_member_bytes: Largest decompressed member to read.
        max_ratio: Largest decompressed/compressed size ratio for members over the floor.

    Raises:
        DataError: If the file is not a readable zip archive.
    """

    def __init__(self, path: str | Path, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 max_ratio: float = DEFAULT_MAX_RATIO) -> None:
        super().__init__(path, max_member_bytes)
        self.max_ratio = max_ratio
        self._infos: list[zipfile.ZipInfo] = []
        try:
            with zipfile.ZipFile(self.path) as archive:
                for info in archive.infolist():
                    self._index(info)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise DataError(
                f"cannot read zip archive {self.path}: {err}; check that the file is a complete "
                "zip archive (list it with `unzip -l`)"
            ) from err
        self._log_skipped()

    def _index(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if stat.S_ISLNK(info.external_attr >> 16):
            self._skip("link", name)
            return
        if info.is_dir():
            return
        unsafe = unsafe_member_name(name)
        if unsafe is not None:
            self._skip("unsafe_name", name, unsafe)
            return
        if not is_image_member(name):
            return
        if info.flag_bits & 0x1:
            self._skip("encrypted", name)
            return
        if info.compress_type not in _ZIP_METHODS:
            self._skip("unsupported", name, f"method {info.compress_type}")
            return
        too_large = self._too_large(info.file_size)
        if too_large is not None:
            self._skip("too_large", name, too_large)
            return
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR_BYTES and ratio > self.max_ratio:
            self._skip("ratio", name, f"{info.compress_size:,} bytes expand to {info.file_size:,} "
                                      f"({ratio:,.0f}x > {self.max_ratio:g}x)")
            return
        self._names.append(name)
        self._infos.append(info)

    def _open(self) -> BinaryIO:
        return open(self.path, "rb")

    def _read(self, handle: BinaryIO, i: int) -> bytes:
        """Decompress member ``i`` in steps of at most 64 KiB, never past its declared size."""
        info, name = self._infos[i], self._names[i]
        cap = info.file_size
        if cap > self.max_member_bytes:
            raise ImageDecodeError(name, f"member is too large: {self._too_large(cap)}")
        handle.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_MAGIC:
            raise ImageDecodeError(name, "bad local header (the archive is corrupt)")
        stored_name = handle.read(fields[-2])
        expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if stored_name != expected:
            raise ImageDecodeError(name, "local header names another file (the archive is corrupt or hostile)")
        handle.seek(fields[-1], os.SEEK_CUR)
        left = info.compress_size

        def read(n: int) -> bytes:
            nonlocal left
            data = handle.read(min(n, left))
            left -= len(data)
            return data

        decompressor: _Decompressor
        if info.compress_type == zipfile.ZIP_DEFLATED:
            decompressor = _Inflate()
        elif info.compress_type == zipfile.ZIP_BZIP2:
            decompressor = bz2.BZ2Decompressor()
        elif info.compress_type == zipfile.ZIP_LZMA:
            decompressor = _lzma_decompressor(read)
        else:
            decompressor = _Stored()
        out = bytearray()
        while not decompressor.eof:
            chunk = b""
            if decompressor.needs_input:
                if left <= 0:
                    break
                chunk = read(_CHUNK)
                if not chunk:
                    raise ImageDecodeError(name, "archive member is cut short (the file is truncated)")
            out += decompressor.decompress(chunk, min(_CHUNK, cap + 1 - len(out)))
            if len(out) > cap:
                raise ImageDecodeError(name, f"member expands past the {cap:,} bytes its header declares "
                                             "(a corrupt or hostile archive); not read further")
        if len(out) != cap or zlib.crc32(out) != info.CRC:
            raise ImageDecodeError(name, f"archive member is corrupt ({len(out):,} of {cap:,} bytes, "
                                         "or a CRC mismatch)")
        return bytes(out)
