"""The artifact store: a local directory or any fsspec URL (``s3://bucket/prefix``).

Job records hold keys relative to the store root (``jobs/<job_id>/checkpoints/…``), never
local paths, so every API and worker host resolves them against its own mount or bucket.

A remote store is shared by every host, so nothing here trusts fsspec's listing cache (another
host may have written or deleted a key since this process last listed its folder): each remote
call first drops the cached listing of the path it asks about.
"""

from __future__ import annotations

import contextlib
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

    def _remote(self, url: str) -> Any:
        """The filesystem, with any cached listing of ``url`` (and its parents) dropped."""
        fs = self._fs()
        fs.invalidate_cache(fs._strip_protocol(url))
        return fs

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
            url = self._url(key)
            self._remote(url).put_file(str(local), url)

    def exists(self, key: str) -> bool:
        if self.is_local:
            return self.local_path(key).is_file()
        url = self._url(key)
        return bool(self._remote(url).isfile(url))

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes.

        Raises:
            FileNotFoundError: There is no such file (a folder is not one).
        """
        if self.is_local:
            path = self.local_path(key)
            if not path.is_file():
                raise FileNotFoundError(f"no artifact {key}")
            return path.stat().st_size
        url = self._url(key)
        info = self._remote(url).info(url)
        if info.get("type") != "file":
            raise FileNotFoundError(f"no artifact {key}")
        return int(info["size"])

    def open(self, key: str) -> IO[bytes]:
        """A readable, seekable binary file for ``key``."""
        if self.is_local:
            return self.local_path(key).open("rb")
        url = self._url(key)
        fh: IO[bytes] = self._remote(url).open(url, "rb")
        return fh

    def list(self, prefix: str) -> list[str]:
        """The keys of every file under the folder ``prefix``, sorted (none if it does not exist)."""
        self._check(prefix)
        if self.is_local:
            base = Path(self.root.removeprefix("file://")).resolve()
            folder = base / prefix
            return sorted(p.relative_to(base).as_posix() for p in folder.rglob("*") if p.is_file())
        url = self._url(prefix)
        fs = self._remote(url)
        root = fs._strip_protocol(self.root).rstrip("/")
        try:
            found = fs.find(url)
        except FileNotFoundError:
            return []
        return sorted(str(path).removeprefix(root + "/") for path in found)

    def delete(self, key: str) -> None:
        """Remove ``key``; a key that is already gone is not an error."""
        if self.is_local:
            self.local_path(key).unlink(missing_ok=True)
            return
        url = self._url(key)
        fs = self._remote(url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(url)
        fs.invalidate_cache(fs._strip_protocol(url))

    def ping(self) -> bool:
        """Whether the store is reachable (for readiness checks).

        A remote root need not exist yet (an empty prefix of a bucket is not an object), so
        the nearest existing folder at or above it counts; a missing bucket does not.
        """
        try:
            if self.is_local:
                Path(self.root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
                return True
            fs = self._remote(self.root)
            path = fs._strip_protocol(self.root).rstrip("/")
            while True:
                try:
                    fs.ls(path)
                    return True
                except FileNotFoundError:
                    if "/" not in path:
                        return False
                    path = path.rsplit("/", 1)[0]
        except Exception:  # readiness must answer, whatever the driver raises (auth, DNS, TLS)
            return False
