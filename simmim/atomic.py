"""Crash-safe file writes: a reader sees either the old file or the complete new one.

Every write goes to a temporary file in the destination's directory (so the final rename
never crosses a filesystem), is hashed while it is written, flushed and ``fsync``-ed, then
renamed over the destination with :func:`os.replace` (atomic on POSIX) and the directory is
``fsync``-ed so the rename itself survives a power loss. A writer that fails or is killed can
only leave a ``.tmp-*`` file behind, never a half-written destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

TEMP_PREFIX = ".tmp-"
"""Name prefix of in-progress temporary files; anything with it may be an interrupted write."""

StrPath = str | os.PathLike[str]


class _HashingWriter:
    """Write-only file wrapper that feeds every byte actually written into a sha256.

    Hashing on the way out avoids reading the (possibly multi-GB) file a second time.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.bytes_written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` and hash the part the underlying file accepted."""
        view = memoryview(data).cast("B")
        written = self._raw.write(view)
        if written is None:  # pragma: no cover - only non-blocking raw files return None
            written = 0
        self._hash.update(view[:written])
        self.bytes_written += written
        return written

    def flush(self) -> None:
        """Flush Python-level buffers of the underlying file."""
        self._raw.flush()

    def writable(self) -> bool:
        """Report that this object accepts writes (some serializers check)."""
        return True

    def hexdigest(self) -> str:
        """Return the sha256 hex digest of everything written so far."""
        return self._hash.hexdigest()


def fsync_directory(directory: StrPath) -> None:
    """``fsync`` a directory so renames and unlinks inside it are durable.

    A no-op where directories cannot be opened (Windows), since there a rename is already
    as durable as the platform allows.
    """
    if os.name != "posix":  # pragma: no cover - exercised only on Windows
        return
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp(directory: Path, final_name: str) -> tuple[Path, BinaryIO]:
    """Create a new, exclusive temporary file next to ``final_name`` and open it for writing.

    ``O_EXCL`` guarantees we never write into somebody else's temp file, and mode 0o666
    (filtered by the umask) gives the final file ordinary permissions, unlike ``mkstemp``.
    """
    for _ in range(100):
        tmp = directory / f"{TEMP_PREFIX}{final_name}-{secrets.token_hex(6)}"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            )
        except FileExistsError:  # pragma: no cover - 48 random bits practically never collide
            continue
        return tmp, os.fdopen(fd, "wb")
    raise FileExistsError(f"could not create a unique temporary file in {directory}")


def atomic_write_with(path: StrPath, writer: Callable[[BinaryIO], None]) -> str:
    """Atomically create or replace ``path`` with whatever ``writer`` writes.

    Args:
        path: Destination file. Its directory must exist.
        writer: Called once with a write-only binary file object (it supports ``write`` and
            ``flush``; it is not seekable). It must not close it.

    Returns:
        The sha256 hex digest of the bytes written, computed while writing.

    Raises:
        Whatever ``writer`` or the filesystem raises. The temporary file is removed first, so
        a failed write leaves ``path`` exactly as it was.
    """
    final = Path(path)
    directory = final.parent
    tmp, fh = _open_temp(directory, final.name)
    try:
        with fh:
            hashing = _HashingWriter(fh)
            writer(cast(BinaryIO, hashing))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(directory)
    return hashing.hexdigest()


def atomic_write_bytes(path: StrPath, data: bytes) -> str:
    """Atomically create or replace ``path`` with ``data``; return its sha256 hex digest."""

    def _write(fh: BinaryIO) -> None:
        fh.write(data)

    return atomic_write_with(path, _write)


def atomic_write_json(path: StrPath, obj: Any) -> str:
    """Atomically write ``obj`` as JSON (sorted keys, indent 2, trailing newline).

    Sorted keys make the file stable across runs so it diffs and hashes reproducibly.
    Returns the sha256 hex digest of the written bytes.
    """
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: StrPath, chunk: int = 1 << 20) -> str:
    """Return the sha256 hex digest of the file at ``path``, read ``chunk`` bytes at a time."""
    with open(path, "rb") as fh:
        return sha256_stream(fh, chunk)


def sha256_stream(fh: BinaryIO, chunk: int = 1 << 20) -> str:
    """Return the sha256 hex digest of ``fh`` from its current position to the end.

    Useful to hash an already-open file and then parse it from the same descriptor, so a
    concurrent rename cannot swap the content between the check and the read.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of bytes, got {chunk}")
    digest = hashlib.sha256()
    while block := fh.read(chunk):
        digest.update(block)
    return digest.hexdigest()
