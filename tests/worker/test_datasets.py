"""Remote dataset locations: http(s) archives and fsspec URLs are fetched once, then used locally."""

from __future__ import annotations

import functools
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest

from jobstore.states import JobStatus
from simmim.data import open_source
from simmim.errors import DataError
from tests.worker.stack import Stack
from worker.datasets import dataset_path


@pytest.fixture(scope="module")
def archive_server(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A loopback HTTP server offering ``digits.tar`` (the training digits)."""
    root = tmp_path_factory.mktemp("http")
    with tarfile.open(root / "digits.tar", "w") as tar:
        tar.add(digits["train"], arcname="train")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_http_archive_is_downloaded_once(archive_server: str, digits: dict[str, Path], tmp_path: Path) -> None:
    path = dataset_path(f"{archive_server}/digits.tar", tmp_path)
    assert path.name == "digits.tar" and path.is_file()
    assert len(open_source(path)) == len(list(digits["train"].rglob("*.png")))
    assert not list(tmp_path.rglob("*.part"))
    mtime = path.stat().st_mtime_ns
    assert dataset_path(f"{archive_server}/digits.tar", tmp_path).stat().st_mtime_ns == mtime


def test_http_errors_are_data_errors(archive_server: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        dataset_path(f"{archive_server}/missing.tar", tmp_path)


def test_fsspec_prefix_is_mirrored(digits: dict[str, Path], tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    sources = sorted(digits["test"].rglob("*.png"))[:6]
    for src in sources:
        fs.pipe_file(f"/bucket/imgs/{src.parent.name}/{src.name}", src.read_bytes())
    path = dataset_path("memory://bucket/imgs", tmp_path)
    assert len(open_source(path)) == len(sources)


def test_worker_trains_on_an_http_archive(worker: Stack, archive_server: str) -> None:
    job_id = worker.create_job(f"{archive_server}/digits.tar", max_steps=2, checkpoint_every=2)
    assert worker.submit(job_id).get(timeout=120) == "succeeded"
    assert worker.job(job_id).status == JobStatus.SUCCEEDED
