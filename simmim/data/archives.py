"""Tar and zip archives as image sources, read member by member without extracting.

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
import stat
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Protocol

from simmim.data.filenames import is_image_member
from simmim.errors import DataError, ImageDecodeError

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_SUFFIXES = (".zip",)

# Guards the "first use in a new process" reset; replaced in a forked child because a
# lock copied while another thread held it would stay locked forever.
_reset_guard = threading.Lock()


def _fresh_reset_guard() -> None:
    global _reset_guard
    _reset_guard = threading.Lock()


os.register_at_fork(after_in_child=_fresh_reset_guard)


class _ArchiveSource:
    """Shared per-process handle management for archive sources.

    Subclasses fill ``self._names`` in ``__init__`` and implement ``_open`` and ``_read``.
    Reads are serialised with a lock so one source can also be used from a thread pool.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, RuntimeError) as err:
                raise ImageDecodeError(name, f"cannot read from {self.path.name}: {err}") from err

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
    def read(self, size: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


def _open_tar_stream(path: Path, compression: str | None) -> _Stream:
    """Open the tar's byte stream, decompressing on the fly."""
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


class TarSource(_ArchiveSource):
    """Images inside a .tar (optionally gzip/bz2/xz compressed) archive.

    The index keeps each member's data offset and size, so a read is one seek and one read
    in the (decompressed) stream. Seeking backwards in a compressed stream restarts
    decompression from the start, so random access into .tar.gz is slow: it works, but
    for training use an uncompressed .tar.

    Args:
        path: The archive file.

    Raises:
        DataError: If the file is not a readable tar archive.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._spans: list[tuple[int, int]] = []
        try:
            with tarfile.open(self.path, "r:*") as tar:
                for member in tar:
                    if member.isreg() and not member.issparse() and is_image_member(member.name):
                        self._names.append(member.name)
                        self._spans.append((member.offset_data, member.size))
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"cannot read tar archive {self.path}: {err}; check that the file is a complete "
                "tar archive (list it with `tar tf`)"
            ) from err
        self.compression = _tar_compression(self.path)
        if self.compression is not None and self._names:
            logger.warning(
                "%s is %s-compressed: random access is slow; for training, repack it as an "
                "uncompressed .tar",
                self.path,
                self.compression,
            )

    def _open(self) -> _Stream:
        return _open_tar_stream(self.path, self.compression)

    def _read(self, handle: _Stream, i: int) -> bytes:
        offset, size = self._spans[i]
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise ImageDecodeError(
                self._names[i], f"archive member is cut short ({len(data)} of {size} bytes)"
            )
        return data


class ZipSource(_ArchiveSource):
    """Images inside a .zip archive, decompressed member by member on read.

    Args:
        path: The archive file.

    Raises:
        DataError: If the file is not a readable zip archive.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._infos: list[zipfile.ZipInfo] = []
        try:
            with zipfile.ZipFile(self.path) as archive:
                for info in archive.infolist():
                    is_link = stat.S_ISLNK(info.external_attr >> 16)
                    if not info.is_dir() and not is_link and is_image_member(info.filename):
                        self._names.append(info.filename)
                        self._infos.append(info)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(
                f"cannot read zip archive {self.path}: {err}; check that the file is a complete "
                "zip archive (list it with `unzip -l`)"
            ) from err

    def _open(self) -> zipfile.ZipFile:
        return zipfile.ZipFile(self.path)

    def _read(self, handle: zipfile.ZipFile, i: int) -> bytes:
        with handle.open(self._infos[i]) as member:
            return member.read()
