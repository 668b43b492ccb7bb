"""Image sources: listing rules, reading, archives and per-process handles."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from simmim.data.sources import (
    IMAGE_EXTENSIONS,
    FolderSource,
    ListFileSource,
    TarSource,
    ZipSource,
    open_source,
)
from simmim.errors import DataError, ImageDecodeError

EXPECTED = ["Z.PNG", "a.jpg", "sub/b.png", "sub/deep/c.JPEG"]


def test_folder_recurses_filters_and_sorts(image_folder: Path) -> None:
    source = FolderSource(image_folder)
    assert [source.name(i) for i in range(len(source))] == EXPECTED
    assert source.read_bytes(2) == (image_folder / "sub" / "b.png").read_bytes()


def test_folder_skips_symlinks_leaving_root(image_folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes((image_folder / "sub" / "b.png").read_bytes())
    (image_folder / "escape.png").symlink_to(outside)
    (image_folder / "inside.png").symlink_to(image_folder / "a.jpg")
    (image_folder / "linked_dir").symlink_to(image_folder / "sub", target_is_directory=True)
    names = [FolderSource(image_folder).name(i) for i in range(len(FolderSource(image_folder)))]
    assert "inside.png" in names
    assert "escape.png" not in names
    assert not any(name.startswith("linked_dir") for name in names)


def test_list_file_comments_blanks_and_relative_paths(image_folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    absolute = image_folder / "a.jpg"
    listing.write_text(f"# training images\n\n../images/sub/b.png\n  {absolute}  \nmissing.png\n")
    source = ListFileSource(listing)
    assert len(source) == 3
    assert source.name(0) == "../images/sub/b.png"
    assert source.read_bytes(0) == (image_folder / "sub" / "b.png").read_bytes()
    assert source.read_bytes(1) == absolute.read_bytes()
    with pytest.raises(ImageDecodeError, match="file not found") as info:
        source.read_bytes(2)
    assert info.value.name == "missing.png"


def test_a_confined_list_refuses_images_outside_its_roots(image_folder: Path, tmp_path: Path) -> None:
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes((image_folder / "sub" / "b.png").read_bytes())
    (image_folder / "link.png").symlink_to(outside / "secret.png")
    listing = image_folder / "list.txt"
    listing.write_text(f"a.jpg\nsub/b.png\n{outside}/secret.png\nsub/../../private/secret.png\nlink.png\n")
    assert len(ListFileSource(listing)) == 5  # the library alone reads what it is given
    with pytest.raises(DataError, match=r"names 3 image\(s\) outside the allowed dataset roots") as info:
        open_source(listing, allowed_roots=[image_folder])
    assert "secret.png" in str(info.value) and "link.png" in str(info.value)
    listing.write_text("a.jpg\nsub/b.png\n")
    confined = open_source(listing, allowed_roots=[tmp_path / "elsewhere", image_folder])
    assert len(confined) == 2 and confined.read_bytes(1) == (image_folder / "sub" / "b.png").read_bytes()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def _write_tar(path: Path, folder: Path, mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        tar.add(folder / "sub", arcname="sub")  # directory + two images, recursively
        _add(tar, "top.jpg", (folder / "a.jpg").read_bytes())
        _add(tar, "__MACOSX/sub/._b.png", b"resource fork")
        _add(tar, "readme.md", b"hello")
        link = tarfile.TarInfo("link.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "top.jpg"
        tar.addfile(link)


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_source_indexes_image_members(
    image_folder: Path, tmp_path: Path, suffix: str, mode: str
) -> None:
    path = tmp_path / f"images{suffix}"
    _write_tar(path, image_folder, mode)
    source = open_source(path)
    assert isinstance(source, TarSource)
    names = [source.name(i) for i in range(len(source))]
    assert sorted(names) == ["sub/b.png", "sub/deep/c.JPEG", "top.jpg"]
    by_name = dict(zip(names, range(len(names)), strict=True))
    # Read out of order to exercise seeking (backwards in the compressed stream too).
    assert source.read_bytes(by_name["top.jpg"]) == (image_folder / "a.jpg").read_bytes()
    expected_b = (image_folder / "sub" / "b.png").read_bytes()
    assert source.read_bytes(by_name["sub/b.png"]) == expected_b


def test_zip_source_indexes_image_members(image_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(image_folder / "a.jpg", "photos/a.jpg")
        archive.writestr("photos/", b"")
        archive.writestr("__MACOSX/photos/._a.jpg", b"fork")
        archive.writestr("photos/.thumb.png", b"hidden")
        archive.writestr("photos/list.csv", b"a,b")
        archive.write(image_folder / "sub" / "b.png", "photos/b.png")
    source = open_source(path)
    assert isinstance(source, ZipSource)
    assert [source.name(i) for i in range(len(source))] == ["photos/a.jpg", "photos/b.png"]
    assert source.read_bytes(1) == (image_folder / "sub" / "b.png").read_bytes()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_reopens_handle_in_new_process(
    image_folder: Path, tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"images.{kind}"
    if kind == "tar":
        _write_tar(path, image_folder)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.write(image_folder / "a.jpg", "top.jpg")
    source = open_source(path)
    first = source.read_bytes(0)
    parent_handle = source._handle  # type: ignore[attr-defined]
    source._pid = -1  # type: ignore[attr-defined]  # as if we were a forked worker
    assert source.read_bytes(0) == first
    assert source._handle is not parent_handle  # type: ignore[attr-defined]
    assert source._pid == os.getpid()  # type: ignore[attr-defined]
    clone = pickle.loads(pickle.dumps(source))  # spawned workers receive a pickled copy
    assert clone.read_bytes(0) == first


def test_open_source_dispatch_and_errors(image_folder: Path, tmp_path: Path) -> None:
    assert isinstance(open_source(image_folder), FolderSource)
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope")
    weird = tmp_path / "data.parquet"
    weird.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"unsupported data source .*\.tar\.gz.*\.zip"):
        open_source(weird)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        open_source(empty)
    assert f"no images found in {empty}" in str(info.value)
    assert ", ".join(IMAGE_EXTENSIONS) in str(info.value)
    blank_list = tmp_path / "blank.txt"
    blank_list.write_text("# nothing yet\n\n")
    with pytest.raises(DataError, match="no images found"):
        open_source(blank_list)


def test_corrupt_archives_raise_data_error(tmp_path: Path) -> None:
    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(b"\x00not a tar archive" * 10)
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    for path in (bad_tar, bad_zip):
        with pytest.raises(DataError, match="cannot read"):
            open_source(path)
