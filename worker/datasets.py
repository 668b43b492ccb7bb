"""Dataset locations as workers see them, and a quick readability check before training."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from simmim.errors import DataError

if TYPE_CHECKING:
    from simmim.data import ImageSource

HTTP_SCHEMES = ("http://", "https://")
SAMPLE_IMAGES = 16
"""Images decoded up front to catch a dataset of unreadable files before training starts."""
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def dataset_path(location: str, cache_dir: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """A local path for a dataset location, fetching remote ones into ``cache_dir`` first.

    Plain paths and ``file://`` are used in place. ``http(s)://`` archives are downloaded
    (resuming a partial download); other URLs (``s3://…``) go through fsspec with
    ``storage_options`` (e.g. ``endpoint_url``): an archive is copied, a prefix is mirrored.
    A finished fetch is reused by later attempts on the same machine. Processes sharing
    ``cache_dir`` (one per GPU on a host) fetch a location one at a time: the others wait
    for it and reuse it, never reading files that are still being written.

    Raises:
        DataError: The location cannot be fetched, with the reason.
    """
    if "://" not in location or location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    target = cache_dir / "datasets" / hashlib.sha256(location.encode()).hexdigest()[:16]
    name = location.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    done = target / ".complete"
    if done.exists():
        return target / name
    try:
        target.mkdir(parents=True, exist_ok=True)
        with _exclusive(target / ".lock"):
            if done.exists():  # another process fetched it while this one waited
                return target / name
            if location.startswith(HTTP_SCHEMES):
                _download_http(location, target / name)
            else:
                _fetch_fsspec(location, target / name, storage_options or {})
            done.touch()
    except (OSError, httpx.HTTPError, ValueError) as err:
        raise DataError(f"could not fetch {location}: {err}") from None
    return target / name


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (released when the process dies, too)."""
    with lock_file.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_http(url: str, out: Path) -> None:
    part = out.with_name(out.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with httpx.stream("GET", url, headers=headers, follow_redirects=True,
                      timeout=httpx.Timeout(30.0, read=300.0)) as response:
        if response.status_code not in (200, 206):
            raise ValueError(f"HTTP {response.status_code}")
        with part.open("ab" if response.status_code == 206 else "wb") as f:
            for chunk in response.iter_bytes(1 << 20):
                f.write(chunk)
    part.replace(out)


def _fetch_fsspec(url: str, out: Path, storage_options: dict[str, Any]) -> None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as err:
        raise ValueError(f"{err}; install the fsspec driver for this scheme (s3fs for s3://)") from None
    if url.lower().endswith(ARCHIVE_SUFFIXES):
        fs.get_file(path, str(out))
    else:
        fs.get(path.rstrip("/") + "/", str(out) + "/", recursive=True)


def check_sample(source: ImageSource, max_pixels: int, count: int = SAMPLE_IMAGES) -> None:
    """Decode the first ``count`` images; fail when none of them is readable.

    Raises:
        DataError: Every sampled image is unreadable, with the first reason.
    """
    from simmim.data import decode_image
    from simmim.errors import ImageDecodeError

    reasons = []
    for i in range(min(count, len(source))):
        try:
            decode_image(source.read_bytes(i), source.name(i), max_pixels)
            return
        except ImageDecodeError as err:
            reasons.append(f"{err.name}: {err.reason}")
    raise DataError(f"none of the first {len(reasons)} images of the dataset could be decoded "
                    f"(e.g. {reasons[0]}); check that it holds valid image files")
