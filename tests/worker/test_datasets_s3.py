"""Datasets on an S3-compatible server (moto): fetched once per host, even by concurrent processes."""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simmim.data import open_source
from simmim.errors import DataError
from tests.s3 import S3, s3_server
from worker import datasets
from worker.datasets import dataset_path


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def bucket(s3: S3, digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A bucket with 40 digits under ``digits/`` and the same 40 as ``digits.tar``."""
    name = s3.new_bucket()
    files = sorted(digits["test"].rglob("*.png"))[:40]
    archive = tmp_path_factory.mktemp("tar") / "digits.tar"
    with tarfile.open(archive, "w") as tar:
        for path in files:
            s3.client.upload_file(str(path), name, f"digits/{path.parent.name}/{path.name}")
            tar.add(path, arcname=f"{path.parent.name}/{path.name}")
    s3.client.upload_file(str(archive), name, "digits.tar")
    return name


def test_a_prefix_and_an_archive_are_fetched_with_the_storage_options(s3: S3, bucket: str, tmp_path: Path) -> None:
    folder = dataset_path(f"s3://{bucket}/digits/", tmp_path, s3.storage_options)
    assert folder.is_dir() and folder.is_relative_to(tmp_path / "datasets") and len(open_source(folder)) == 40
    archive = dataset_path(f"s3://{bucket}/digits.tar", tmp_path, s3.storage_options)
    assert archive.name == "digits.tar" and len(open_source(archive)) == 40
    assert dataset_path(f"s3://{bucket}/digits/", tmp_path, s3.storage_options) == folder  # reused
    with pytest.raises(DataError, match=f"could not fetch s3://{bucket}/nothing.tar"):
        dataset_path(f"s3://{bucket}/nothing.tar", tmp_path, s3.storage_options)


def test_processes_sharing_a_work_dir_fetch_a_location_once(s3: S3, bucket: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fetches: list[str] = []
    real_fetch = datasets._fetch_fsspec
    started = threading.Event()

    def slow_fetch(url: str, out: Path, options: dict[str, Any]) -> None:
        fetches.append(url)
        started.set()
        real_fetch(url, out, options)
        threading.Event().wait(0.5)  # a big dataset: the other process arrives mid-download

    monkeypatch.setattr(datasets, "_fetch_fsspec", slow_fetch)
    results: dict[str, Path] = {}

    def fetch(name: str) -> None:
        results[name] = dataset_path(f"s3://{bucket}/digits/", tmp_path, s3.storage_options)
        assert len(open_source(results[name])) == 40  # complete when it is handed out

    first = threading.Thread(target=fetch, args=("first",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=fetch, args=("second",))
    second.start()
    first.join(30)
    second.join(30)
    assert fetches == [f"s3://{bucket}/digits/"]
    assert results["first"] == results["second"] and len(open_source(results["second"])) == 40


def test_a_failed_fetch_is_retried_by_the_next_attempt(s3: S3, bucket: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(url: str, out: Path, options: dict[str, Any]) -> None:
        raise OSError("connection reset by peer")

    with monkeypatch.context() as patch:
        patch.setattr(datasets, "_fetch_fsspec", broken)
        with pytest.raises(DataError, match="connection reset by peer"):
            dataset_path(f"s3://{bucket}/digits.tar", tmp_path, s3.storage_options)
    assert len(open_source(dataset_path(f"s3://{bucket}/digits.tar", tmp_path, s3.storage_options))) == 40
