"""Helpers shared by the benchmark scripts: environment record and JSON output.

Scripts are run by hand (``.venv/bin/python bench/<script>.py --help``); they print one JSON
document to stdout and, with ``--out``, write the same document to a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # make `simmim` importable when run as `python bench/x.py`
    sys.path.insert(0, str(REPO_ROOT))


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (falls back to ``platform.processor``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """A human name for the device the benchmark ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({usable_cpus()} usable cores, {torch.get_num_threads()} torch threads)"


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset / container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and date: what a reader needs to compare two result files."""
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": package_version("timm"),
        "lightly": package_version("lightly"),
        "scikit-learn": package_version("scikit-learn"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "host": platform.node(),
    }


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print ``result`` as JSON on stdout and write it to ``out`` when given."""
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def log(message: str) -> None:
    """Progress messages go to stderr so stdout stays pure JSON."""
    print(message, file=sys.stderr, flush=True)
