"""Fixtures for the API tests: the real app served by uvicorn on a free port, spoken to over HTTP.

Each test gets its own app and job store (SQLite by default; ``test_jobs.py`` also runs on
PostgreSQL). The dispatcher is an in-test fake unless a test asks for the real Celery one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from api.main import create_app
from simmim_service.artifacts import ArtifactStore
from simmim_service.settings import Settings
from tests.api.fakes import FakeDispatcher
from tests.services import redis_server

ALICE, BOB = "key-alice-0123456789", "key-bob-0123456789"
CLOSED_BROKER = "redis://127.0.0.1:1/0"


@dataclass
class LiveApi:
    """A running app: its URL, its pieces, and clients per API key."""

    app: FastAPI
    url: str
    settings: Settings
    dispatcher: Any
    clients: list[httpx.Client]

    def client(self, key: str | None = ALICE, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=20, **kwargs)
        self.clients.append(client)
        return client

    @property
    def sessions(self) -> sessionmaker[Session]:
        factory: sessionmaker[Session] = self.app.state.sessions
        return factory

    @property
    def artifacts(self) -> ArtifactStore:
        store: ArtifactStore = self.app.state.artifacts
        return store


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def make_settings(tmp: Path, database_url: str, **overrides: Any) -> Settings:
    """Small limits so that limit tests stay small; two tenants with keys."""
    values: dict[str, Any] = {
        "database_url": database_url, "artifact_root": str(tmp / "artifacts"),
        "allowed_roots": [str(tmp / "datasets")], "api_keys": {ALICE: "alice", BOB: "bob"},
        "auth_required": True, "broker_url": CLOSED_BROKER, "result_backend": CLOSED_BROKER,
        "max_embed_images": 4, "max_embed_bytes": 200_000, "max_image_pixels": 4096 * 4096,
        "embed_timeout_s": 5.0,
    }
    values.update(overrides)
    (tmp / "datasets" / "digits").mkdir(parents=True, exist_ok=True)
    return Settings(**values)


@contextmanager
def live_api(settings: Settings, dispatcher: Any = None) -> Iterator[LiveApi]:
    """The app for ``settings`` served over HTTP (``dispatcher=None``: the real Celery one)."""
    app = create_app(settings, dispatcher)
    with serve(app) as url:
        live = LiveApi(app=app, url=url, settings=settings, dispatcher=app.state.dispatcher, clients=[])
        try:
            yield live
        finally:
            for client in live.clients:
                client.close()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def settings(tmp_path: Path, store_url: str) -> Settings:
    return make_settings(tmp_path, store_url)


@pytest.fixture
def fake() -> FakeDispatcher:
    return FakeDispatcher()


@pytest.fixture
def api(settings: Settings, fake: FakeDispatcher) -> Iterator[LiveApi]:
    with live_api(settings, fake) as live:
        yield live


@pytest.fixture
def alice(api: LiveApi) -> httpx.Client:
    return api.client(ALICE)


@pytest.fixture
def bob(api: LiveApi) -> httpx.Client:
    return api.client(BOB)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def job_body(settings: Settings, **training: Any) -> dict[str, Any]:
    """A valid ``JobCreate`` body for a tiny ViT on the test dataset folder."""
    spec = {"model": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4, "mask_patch_size": 8,
            "epochs": 2, "batch_size": 16}
    spec.update(training)
    return {"dataset": str(Path(settings.allowed_roots[0]) / "digits"), "training": spec,
            "name": "tiny", "metadata": {"team": "vision"}}


def assert_problem(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem with ``status`` whose detail mentions every needle."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert body["instance"] == response.request.url.path
    text = body["detail"] + " " + " ".join(e["field"] + " " + e["message"] for e in body.get("errors") or [])
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return body
