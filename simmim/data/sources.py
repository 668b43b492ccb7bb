"""Image sources: list the images of a folder, a list file or an archive without loading them.

Every source has a fixed, deterministic order, so an image index means the same file on every
machine and every run; resumable sampling depends on that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from simmim.data.archives import (
    DEFAULT_MAX_MEMBER_BYTES,
    TAR_SUFFIXES,
    ZIP_SUFFIXES,
    TarSource,
    ZipSource,
)
from simmim.data.filenames import IMAGE_EXTENSIONS, is_image_member
from simmim.errors import DataError, ImageDecodeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderSource",
    "ImageSource",
    "ListFileSource",
    "TarSource",
    "ZipSource",
    "open_source",
]

LIST_SUFFIXES = (".txt",)
_SUPPORTED = (
    "a folder, a .txt list of image paths, or an archive ("
    + ", ".join(TAR_SUFFIXES + ZIP_SUFFIXES)
    + ")"
)


@runtime_checkable
class ImageSource(Protocol):
    """A fixed, ordered collection of encoded images."""

    def __len__(self) -> int: ...

    def name(self, i: int) -> str:
        """Human-readable name of image ``i`` (relative path, member path or listed path)."""
        ...

    def read_bytes(self, i: int) -> bytes:
        """Encoded bytes of image ``i``; raises ImageDecodeError when they cannot be read."""
        ...


def _read_file(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageDecodeError(name, "file not found") from err
    except OSError as err:
        raise ImageDecodeError(name, f"cannot read file: {err.strerror or err}") from err


class FolderSource:
    """Every image under a folder, searched recursively, in sorted order.

    Hidden files and folders are skipped. Symlinked files are kept only when they point
    inside ``root``; symlinked folders are never entered (this also rules out link loops).

    Args:
        root: The folder to search.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        real_root = self.root.resolve()
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            here = Path(dirpath)
            for filename in filenames:
                relative = (here / filename).relative_to(self.root).as_posix()
                if is_image_member(relative) and _stays_inside(here / filename, real_root):
                    names.append(relative)
        self._names = sorted(names)

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        """Path of image ``i`` relative to the root, with ``/`` separators."""
        return self._names[i]

    def read_bytes(self, i: int) -> bytes:
        """Bytes of image ``i``; raises ImageDecodeError if the file cannot be read."""
        return _read_file(self.root / self._names[i], self._names[i])

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, images={len(self)})"


def _stays_inside(path: Path, real_root: Path) -> bool:
    """False for a symlink whose target lies outside ``real_root``."""
    if not path.is_symlink():
        return True
    return path.resolve().is_relative_to(real_root)


class ListFileSource:
    """Images listed one per line in a text file.

    Blank lines and lines starting with ``#`` are ignored; relative paths are resolved
    against the list file's folder. Listed files are not checked here: a missing one fails
    when read, so validation reports it and training skips it.

    Args:
        txt_path: The UTF-8 list file.
        confine_to: Folders every listed image must lie in once symlinks and ``..`` are
            resolved (a service's allowed dataset roots: a list file inside them must not
            reach images outside). Empty or None: anywhere.

    Raises:
        DataError: If the list file cannot be read as UTF-8 text, or lists images outside
            ``confine_to``.
    """

    def __init__(self, txt_path: str | Path, *, confine_to: Sequence[str | Path] | None = None) -> None:
        self.txt_path = Path(txt_path)
        try:
            lines = self.txt_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(
                f"cannot read image list {self.txt_path}: {err}; it must be a UTF-8 text file "
                "with one image path per line"
            ) from err
        base = self.txt_path.parent
        self._names: list[str] = []
        self._paths: list[Path] = []
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                self._names.append(entry)
                self._paths.append(base / Path(entry).expanduser())
        if confine_to:
            self._check_confined([Path(root).resolve() for root in confine_to])

    def _check_confined(self, roots: list[Path]) -> None:
        outside = [name for name, path in zip(self._names, self._paths, strict=True)
                   if not any(path.resolve().is_relative_to(root) for root in roots)]
        if outside:
            shown = ", ".join(repr(name) for name in outside[:3])
            raise DataError(
                f"image list {self.txt_path} names {len(outside)} image(s) outside the allowed dataset roots "
                f"({', '.join(map(str, roots))}), e.g. {shown}; symlinks and '..' are resolved first"
            )

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        """The path of image ``i`` exactly as written in the list."""
        return self._names[i]

    def read_bytes(self, i: int) -> bytes:
        """Bytes of image ``i``; raises ImageDecodeError if the file is missing or unreadable."""
        return _read_file(self._paths[i], self._names[i])

    def __repr__(self) -> str:
        return f"ListFileSource({str(self.txt_path)!r}, images={len(self)})"


def open_source(location: str | Path, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                allowed_roots: Sequence[str | Path] | None = None) -> ImageSource:
    """Open a folder, list file or archive as an image source, chosen by what the path is.

    Archives are read in place, never extracted; their links, absolute or ``..`` names and
    members over ``max_member_bytes`` are skipped (see :mod:`simmim.data.archives`).

    Args:
        location: A folder (searched recursively), a ``.txt`` file with one image path per
            line, or a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive.
        max_member_bytes: Largest decompressed archive member to read (zip bombs).
        allowed_roots: Folders a ``.txt`` list's images must lie in (see ListFileSource).
            Folders and archives are confined by construction: a folder's symlinks may not
            leave it and archives are read in place.

    Returns:
        The source, holding at least one image.

    Raises:
        DataError: If the path does not exist, is an unsupported file type, holds no images,
            or is a list naming images outside ``allowed_roots``.
    """
    path = Path(location).expanduser()
    if not path.exists():
        raise DataError(f"data source {path} does not exist; pass {_SUPPORTED}")
    lower = path.name.lower()
    source: ImageSource
    if path.is_dir():
        source = FolderSource(path)
    elif lower.endswith(LIST_SUFFIXES):
        source = ListFileSource(path, confine_to=allowed_roots)
    elif lower.endswith(TAR_SUFFIXES):
        source = TarSource(path, max_member_bytes)
    elif lower.endswith(ZIP_SUFFIXES):
        source = ZipSource(path, max_member_bytes)
    else:
        raise DataError(f"unsupported data source {path}; pass {_SUPPORTED}")
    if len(source) == 0:
        skipped = source.skip_summary() if isinstance(source, TarSource | ZipSource) else ""
        raise DataError(
            f"no images found in {path}; supported extensions: {', '.join(IMAGE_EXTENSIONS)}"
            + (" (hidden files and folders are skipped)" if path.is_dir() else "")
            + (f"; skipped archive members: {skipped}" if skipped else "")
        )
    return source
