"""validate_source: counts, reasons, summary and the threaded path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from simmim.data.sources import FolderSource
from simmim.data.validate import DataReport, validate_source

MakeImage = Callable[..., Image.Image]


@pytest.fixture
def problem_folder(tmp_path: Path, make_image: MakeImage) -> Path:
    """3 good images, a truncated JPEG, a text file named .png and a 10x40 image."""
    root = tmp_path / "check"
    root.mkdir()
    for i in range(3):
        make_image(48, 40, seed=i).save(root / f"good{i}.jpg")
    data = (root / "good0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "fake.png").write_text("definitely not a PNG")
    make_image(10, 40, seed=9).save(root / "thin.png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_report_counts_problems(problem_folder: Path, workers: int) -> None:
    calls: list[tuple[int, int]] = []
    report = validate_source(
        FolderSource(problem_folder), workers=workers, progress=lambda d, t: calls.append((d, t))
    )
    assert (report.total, report.ok) == (6, 3)
    assert [name for name, _ in report.unreadable] == ["cut.jpg", "fake.png"]
    assert "truncated" in report.unreadable[0][1]
    assert "not an image" in report.unreadable[1][1]
    assert report.tiny == [("thin.png", 10, 40)]
    assert calls[-1] == (6, 6) and len(calls) == 6
    assert json.loads(json.dumps(report.to_dict()))["tiny"] == [["thin.png", 10, 40]]
    summary = report.summary()
    assert summary.splitlines()[0].startswith("checked 6 images: 3 ok, 2 unreadable, 1 smaller")
    assert "cut.jpg" in summary and "thin.png: 10x40" in summary


def test_min_size_threshold(problem_folder: Path) -> None:
    report = validate_source(FolderSource(problem_folder), min_size=8)
    assert report.ok == 4 and report.tiny == []


def test_summary_lists_at_most_twenty_problems() -> None:
    report = DataReport(total=30, ok=5, unreadable=[(f"bad{i}.jpg", "empty") for i in range(25)])
    lines = report.summary().splitlines()
    assert sum("bad" in line for line in lines) == 20
    assert "  ... and 5 more" in lines
    assert "checked 5 images" not in lines[0]
    assert DataReport(total=2, ok=2).summary() == (
        "checked 2 images: 2 ok, 0 unreadable, 0 smaller than 16 px on a side"
    )
