"""The artifact store: a local directory or any fsspec URL (``s3://bucket/prefix``).

Job records hold keys relative to the store root (``jobs/<job_id>/checkpoints/…``), never
local paths, so every API and worker host resolves them against its own mount or bucket.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import IO, Any

from simmim.atomic import atomic_write_with


def job_prefix(job_id: str) -> str:
    """Where a job's artifacts live, relative to the store root."""
    return f"jobs/{job_id}"


class ArtifactStore:
    """Reads and writes artifacts by key; keys are ``/``-separated and relative."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.is_local = "://" not in root or root.startswith("file://")

    def _check(self, key: str) -> str:
        parts = key.split("/")
        if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid artifact key {key!r}")
        return key

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` on a local store."""
        if not self.is_local:
            raise ValueError("local_path() needs a local artifact store")
        return Path(self.root.removeprefix("file://")).resolve() / self._check(key)

    def _fs(self) -> Any:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(self.root, **self.storage_options)
        return fs

    def _url(self, key: str) -> str:
        return f"{self.root}/{self._check(key)}"

    def put_file(self, local: Path, key: str) -> None:
        """Copy a finished local file into the store (atomically on a local store)."""
        if self.is_local:
            target = self.local_path(key)
            if target == local.resolve():
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            with local.open("rb") as src:
                atomic_write_with(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
        else:
            self._fs().put_file(str(local), self._url(key))

    def exists(self, key: str) -> bool:
        return self.local_path(key).is_file() if self.is_local else bool(self._fs().exists(self._url(key)))

    def size(self, key: str) -> int:
        return self.local_path(key).stat().st_size if self.is_local else int(self._fs().size(self._url(key)))

    def open(self, key: str) -> IO[bytes]:
        """A readable, seekable binary file for ``key``."""
        if self.is_local:
            return self.local_path(key).open("rb")
        fh: IO[bytes] = self._fs().open(self._url(key), "rb")
        return fh

    def ping(self) -> bool:
        """Whether the store is reachable (for readiness checks)."""
        try:
            if self.is_local:
                Path(self.root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
                return True
            self._fs().ls(self.root)
            return True
        except OSError:
            return False
