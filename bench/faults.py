"""Fault report: run the tests that do damage on purpose and summarise what they proved.

Usage::

    .venv/bin/python bench/faults.py --out bench/results/faults_cpu.json

It runs the fault-injection and bad-input tests (real workers, Redis, PostgreSQL/SQLite,
tiny models on real images) under pytest with a JUnit XML report. Each test records what
it did with ``record_property``: ``faults_injected`` (worker SIGKILLed, Redis restarted,
process killed mid-checkpoint, injected CUDA OOMs, hung training, API/embedded restarts,
a killed DDP rank), ``jobs`` (jobs that had to survive it) and ``bad_inputs`` (hostile
archives, bomb images, fuzzed requests, over-limit requests). A failing test counts its
jobs as lost: the tests assert that every job ends in the true terminal state with exactly
the steps asked for and every checkpoint intact, so "lost" here means "not proven safe".
Prints one JSON document; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import environment

ROOT = Path(__file__).resolve().parents[1]

SUITES = {
    "worker faults": ["tests/worker/test_faults.py"],
    "service restarts": ["tests/test_restarts.py"],
    "multi-process training": ["tests/simmim/test_launch.py::test_a_killed_rank_fails_the_run_and_takes_the_others_down",
                               "tests/worker/test_multi_gpu.py::test_cancel_stops_both_processes"],
    "hostile archives and images": ["tests/simmim/data/test_hostile_archives.py"],
    "API fuzzing and limits": ["tests/api/test_openapi_fuzz.py", "tests/api/test_limits.py"],
}


def run_suite(targets: list[str], work: Path) -> list[dict[str, Any]]:
    """Run ``targets`` under pytest; one dict per test case with its outcome and properties."""
    report = work / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={report}", *targets], cwd=ROOT, check=False)
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failed = any(case.find(tag) is not None for tag in ("failure", "error"))
        skipped = case.find("skipped") is not None
        cases.append({
            "test": f"{case.get('classname')}::{case.get('name')}",
            "outcome": "failed" if failed else "skipped" if skipped else "passed",
            "seconds": round(float(case.get("time") or 0), 1),
            **{k: int(v) for k, v in props.items() if k and v is not None and v.lstrip("-").isdigit()},
        })
    return cases


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.monotonic()
    suites: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, targets in SUITES.items():
            work = Path(tmp) / name.replace(" ", "_")
            work.mkdir()
            suites[name] = run_suite(targets, work)
    cases = [c for group in suites.values() for c in group]

    def total(key: str, outcome: str | None = None) -> int:
        return sum(c.get(key, 0) for c in cases if outcome is None or c["outcome"] == outcome)

    result = {
        "benchmark": "faults",
        "environment": environment(torch.device("cpu")),
        "summary": {
            "faults_injected": total("faults_injected"),
            "jobs_exposed_to_faults": total("jobs"),
            "jobs_survived": total("jobs", "passed"),
            "jobs_or_checkpoints_lost": total("jobs", "failed"),
            "bad_inputs_tried": total("bad_inputs"),
            "bad_inputs_not_refused": total("bad_inputs", "failed"),
            "tests_passed": sum(c["outcome"] == "passed" for c in cases),
            "tests_failed": sum(c["outcome"] == "failed" for c in cases),
            "tests_skipped": sum(c["outcome"] == "skipped" for c in cases),
        },
        "suites": suites,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
