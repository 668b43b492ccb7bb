"""One Redis server, SQLite store and Celery worker process per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import redis_server
from tests.worker.stack import Stack, celery_worker, make_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A migrated SQLite job store, an artifact root and a private Redis (no worker yet)."""
    workdir = tmp_path_factory.mktemp("stack")
    with redis_server(workdir) as redis_url:
        stack = make_stack(workdir, f"sqlite:///{workdir / 'jobs.db'}", redis_url)
        yield stack
        stack.close()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[Stack]:
    """The stack with one real worker process consuming both queues."""
    with celery_worker(stack, "w1"):
        yield stack


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corrupt")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return folder
