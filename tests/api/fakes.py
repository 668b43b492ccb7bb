"""An in-test ``Dispatcher`` that records what the API sent and answers deterministically."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from api.errors import ProblemError, ServiceUnavailable

DIM = 8


def fake_vector(image: bytes) -> list[float]:
    """A deterministic 8-d vector derived from the image bytes."""
    digest = hashlib.sha256(image).digest()
    return [b / 255 for b in digest[:DIM]]


class FakeDispatcher:
    """Records every call; set ``broker_down`` or ``embed_error`` to simulate failures."""

    def __init__(self) -> None:
        self.pretrain: list[str] = []
        self.pretrain_gpus: dict[str, int] = {}
        self.embedding_runs: list[tuple[str, str]] = []
        self.embed_calls: list[tuple[dict[str, Any], float]] = []
        self.broker_down = False
        self.embed_error: ProblemError | None = None

    def _check_broker(self) -> None:
        if self.broker_down:
            raise ServiceUnavailable("the task broker is unreachable (fake)")

    def enqueue_pretrain(self, job_id: str, gpus: int = 1) -> None:
        self._check_broker()
        self.pretrain.append(job_id)
        self.pretrain_gpus[job_id] = gpus

    def enqueue_embedding_run(self, job_id: str, run_id: str) -> None:
        self._check_broker()
        self.embedding_runs.append((job_id, run_id))

    def embed(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.embed_calls.append((payload, timeout))
        if self.embed_error is not None:
            raise self.embed_error
        vectors = [fake_vector(base64.b64decode(b)) for b in payload["images_b64"]]
        return {"embeddings": vectors, "dim": DIM, "checkpoint_id": payload["checkpoint_id"],
                "model": "vit_tiny_patch16_224"}

    def ping(self) -> bool:
        return not self.broker_down
