"""Tests for simmim.atomic: all-or-nothing writes with an on-the-fly sha256."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from simmim.atomic import (
    TEMP_PREFIX,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_with,
    sha256_file,
)


def test_write_bytes_returns_sha256_of_content(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    data = os.urandom(3000)

    digest = atomic_write_bytes(target, data)

    assert target.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest() == sha256_file(target)
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_write_with_hashes_every_chunk_including_memoryviews(tmp_path: Path) -> None:
    target = tmp_path / "chunks.bin"
    parts: list[bytes | bytearray | memoryview] = [
        b"abc",
        bytearray(b"def"),
        memoryview(b"ghij"),
        b"",
    ]

    def writer(fh: BinaryIO) -> None:
        for part in parts:
            fh.write(part)

    digest = atomic_write_with(str(target), writer)

    assert target.read_bytes() == b"abcdefghij"
    assert digest == hashlib.sha256(b"abcdefghij").hexdigest()


def test_temp_file_lives_in_destination_directory(tmp_path: Path) -> None:
    seen: list[str] = []

    def writer(fh: BinaryIO) -> None:
        seen.extend(os.listdir(tmp_path))
        fh.write(b"x")

    atomic_write_with(tmp_path / "out.bin", writer)

    assert len(seen) == 1 and seen[0].startswith(TEMP_PREFIX)
    assert os.listdir(tmp_path) == ["out.bin"]


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_bytes(b"old")

    atomic_write_bytes(target, b"new")

    assert target.read_bytes() == b"new"


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_writer_raising_midway_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "half.bin"

    def writer(fh: BinaryIO) -> None:
        fh.write(b"x" * 100_000)
        raise error

    with pytest.raises(type(error)):
        atomic_write_with(target, writer)

    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "keep.bin"
    atomic_write_bytes(target, b"good")

    def writer(fh: BinaryIO) -> None:
        fh.write(b"bad, partial")
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        atomic_write_with(target, writer)

    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_fsyncs_the_file_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_bytes(tmp_path / "durable.bin", b"data")

    assert kinds == ["file", "dir"]


def test_missing_directory_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "nope" / "f.bin", b"x")
    assert os.listdir(tmp_path) == []


def test_write_json_is_sorted_indented_and_newline_terminated(tmp_path: Path) -> None:
    target = tmp_path / "m.json"

    digest = atomic_write_json(target, {"b": 1, "a": [1, 2], "c": {"z": None, "y": "é"}})

    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert text.splitlines()[1] == '  "a": ['
    assert json.loads(text) == {"a": [1, 2], "b": 1, "c": {"y": "é", "z": None}}
    assert digest == sha256_file(target)


def test_sha256_file_is_independent_of_chunk_size(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    data = os.urandom(10_001)
    target.write_bytes(data)

    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(target) == expected
    assert sha256_file(target, chunk=7) == expected
    with pytest.raises(ValueError, match="positive"):
        sha256_file(target, chunk=0)
