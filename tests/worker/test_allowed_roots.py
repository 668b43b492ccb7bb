"""A worker confined to SIMMIM_ALLOWED_ROOTS: an image list may not reach images outside them.

The API refuses such a list when the job is submitted (tests/api/test_errors.py); these jobs are
written straight into the store, as if the list had changed after the API looked at it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobstore.states import JobStatus
from tests.worker.stack import Stack, celery_worker


@pytest.fixture(scope="module")
def confined(stack: Stack, tmp_path_factory: pytest.TempPathFactory,
             digits: dict[str, Path]) -> Iterator[tuple[Stack, Path, Path]]:
    """A worker allowed only ``root``, which holds a copy of the training digits."""
    root = tmp_path_factory.mktemp("allowed")
    shutil.copytree(digits["train"], root / "digits")
    outside = tmp_path_factory.mktemp("private")
    shutil.copy(sorted((root / "digits").rglob("*.png"))[0], outside / "secret.png")
    with celery_worker(stack, "confined", env={"SIMMIM_ALLOWED_ROOTS": json.dumps([str(root)])}):
        yield stack, root, outside


def _names(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in sorted((root / "digits").rglob("*.png"))]


def test_a_list_inside_the_roots_trains(confined: tuple[Stack, Path, Path]) -> None:
    stack, root, _ = confined
    listing = root / "inside.txt"
    listing.write_text("\n".join(_names(root)[:64]) + "\n")
    job_id = stack.create_job(listing, max_steps=2, checkpoint_every=2)
    assert stack.submit(job_id).get(timeout=120) == "succeeded", stack.job(job_id).error_message


def test_a_list_reaching_outside_the_roots_fails_before_training(confined: tuple[Stack, Path, Path]) -> None:
    stack, root, outside = confined
    listing = root / "leaky.txt"
    listing.write_text("\n".join([*_names(root)[:64], str(outside / "secret.png"),
                                  f"digits/../../{outside.name}/secret.png"]) + "\n")
    job_id = stack.create_job(listing, max_steps=2, checkpoint_every=2)
    assert stack.submit(job_id).get(timeout=120) == "failed"
    job = stack.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "data_error")
    assert "names 2 image(s) outside the allowed dataset roots" in (job.error_message or ""), job.error_message
    assert not (job.progress or {}).get("step")  # refused before a single step
