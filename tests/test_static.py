"""The code base stays lint- and type-clean: ruff and mypy run as part of the suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed in this environment (pip install -e '.[dev]')")
    return path


def test_ruff_is_clean() -> None:
    dirs = [d for d in ("simmim", "simmim_service", "jobstore", "api", "worker", "tests", "bench") if (ROOT / d).is_dir()]
    proc = subprocess.run([_tool("ruff"), "check", *dirs], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean() -> None:
    proc = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
