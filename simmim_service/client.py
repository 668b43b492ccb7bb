"""A typed Python client for the service's HTTP API (used by ``simmim-service`` and by users).

    client = SimMIMClient("http://127.0.0.1:8000", api_key="...")
    job = client.create_job({"dataset": "/data/images", "training": {"model": "vit_small_patch16_224"}})
    for event in client.events(job["id"]):
        print(event.type, event.data)
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from simmim.atomic import sha256_file

TERMINAL = {"succeeded", "failed", "cancelled"}


class APIError(Exception):
    """The service answered with an RFC 9457 problem; ``problem`` holds its body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        lines = [f"{status} {problem.get('title', 'error')}: {problem.get('detail', '')}".rstrip(": ")]
        lines += [f"  - {e.get('field', '')}: {e.get('message', '')}" for e in problem.get("errors", [])]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job."""

    id: int
    type: str
    data: dict[str, Any]


class SimMIMClient:
    """Thin, typed wrapper over ``/v1``; every error becomes ``APIError``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                 transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SimMIMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            raise APIError(response.status_code, problem)
        return response.json()

    def create_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self._json(self.http.post("/v1/jobs", json=spec, headers=headers))
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get(f"/v1/jobs/{job_id}"))
        return result

    def list_jobs(self, limit: int = 20, after: str | None = None, status: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        if status:
            params["status"] = status
        result: dict[str, Any] = self._json(self.http.get("/v1/jobs", params=params))
        return result

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))
        return result

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json(self.http.get(f"/v1/jobs/{job_id}/checkpoints"))["data"]
        return result

    def metrics(self, job_id: str, key: str, max_points: int = 500) -> list[dict[str, Any]]:
        body = self._json(self.http.get(f"/v1/jobs/{job_id}/metrics", params={"key": key, "max_points": max_points}))
        points: list[dict[str, Any]] = body["points"]
        return points

    def events(self, job_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """Follow the job's event stream until it ends, reconnecting with ``Last-Event-ID``."""
        last = last_event_id
        while True:
            headers = {"Last-Event-ID": str(last)} if last is not None else {}
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                  timeout=httpx.Timeout(10.0, read=60.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._json(response)
                for event in _parse_sse(response.iter_lines()):
                    last = event.id
                    yield event
            if self.get_job(job_id)["status"] in TERMINAL:
                return

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job is terminal; returns the final job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job
            time.sleep(poll)

    def download(self, job_id: str, checkpoint: dict[str, Any], out: Path) -> Path:
        """Download a checkpoint or encoder, resuming a partial ``out.part``; verifies sha256."""
        part = out.with_name(out.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        url = f"/v1/jobs/{job_id}/checkpoints/{checkpoint['id']}/content"
        with self.http.stream("GET", url, headers=headers, timeout=httpx.Timeout(30.0, read=300.0)) as response:
            if response.status_code == 416:
                have = -1  # already complete
            elif response.status_code >= 400:
                response.read()
                self._json(response)
            else:
                mode = "ab" if response.status_code == 206 else "wb"
                with part.open(mode) as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
        digest = sha256_file(part)
        if digest != checkpoint["sha256"]:
            part.unlink()
            raise APIError(502, {"title": "corrupt download", "detail": f"sha256 {digest} != {checkpoint['sha256']}"})
        part.replace(out)
        return out

    def embed(self, job_id: str, files: list[Path], pooling: str = "mean", layer: int | None = None,
              normalize: bool = False, checkpoint_id: str | None = None) -> dict[str, Any]:
        """Embeddings of local image files (sent as base64 JSON)."""
        body: dict[str, Any] = {"images": [base64.b64encode(Path(f).read_bytes()).decode() for f in files],
                                "pooling": pooling, "normalize": normalize}
        if layer is not None:
            body["layer"] = layer
        if checkpoint_id is not None:
            body["checkpoint_id"] = checkpoint_id
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/embeddings", json=body))
        return result

    def previews(self, job_id: str) -> list[dict[str, Any]]:
        """The job's reconstruction previews, oldest first: ``{name, step, width, height, url}``."""
        result: list[dict[str, Any]] = self._json(self.http.get(f"/v1/jobs/{job_id}/previews"))["data"]
        return result

    def preview(self, job_id: str, name: str) -> bytes:
        """One preview grid as PNG bytes (``name`` as listed, e.g. ``step_00000010.png``)."""
        return self._bytes(self.http.get(f"/v1/jobs/{job_id}/previews/{name}"))

    def plot(self, job_id: str, keys: list[str] | tuple[str, ...] = ("loss", "lr", "images_per_sec"),
             width: int | None = None, height: int | None = None) -> bytes:
        """A PNG with one panel per metric over steps."""
        params: dict[str, Any] = {"keys": ",".join(keys)}
        params |= {k: v for k, v in (("width", width), ("height", height)) if v is not None}
        return self._bytes(self.http.get(f"/v1/jobs/{job_id}/plot.png", params=params))

    def _bytes(self, response: httpx.Response) -> bytes:
        if response.status_code >= 400:
            self._json(response)  # raises APIError
        return response.content

    def start_embedding_run(self, job_id: str, dataset: str, pooling: str = "mean", layer: int | None = None,
                            normalize: bool = False) -> dict[str, Any]:
        """Queue the embedding of every image of ``dataset`` with the job's encoder; returns the run."""
        body: dict[str, Any] = {"dataset": dataset, "pooling": pooling, "normalize": normalize}
        if layer is not None:
            body["layer"] = layer
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/embedding-runs", json=body))
        return result

    def embedding_run(self, job_id: str, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get(f"/v1/jobs/{job_id}/embedding-runs/{run_id}"))
        return result

    def wait_embedding_run(self, job_id: str, run_id: str, timeout: float = 3600.0,
                           poll: float = 1.0) -> dict[str, Any]:
        """Poll until the run has succeeded or failed (or ``timeout``); returns the run."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.embedding_run(job_id, run_id)
            if run["status"] in TERMINAL or time.monotonic() > deadline:
                return run
            time.sleep(poll)

    def neighbours(self, job_id: str, files: list[Path], k: int = 5, run_id: str | None = None) -> dict[str, Any]:
        """For each local image, the ``k`` most similar images of the job's dataset (cosine).

        Needs a succeeded embedding run of the job's dataset (``start_embedding_run``); each
        neighbour has ``index``, ``name``, ``score`` and ``thumbnail_url`` (see ``dataset_image``).
        """
        params: dict[str, Any] = {"k": k}
        if run_id is not None:
            params["run_id"] = run_id
        parts = [("files", (Path(f).name, Path(f).read_bytes(), "application/octet-stream")) for f in files]
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/neighbours", params=params,
                                                           files=parts))
        return result

    def dataset_image(self, job_id: str, index: int, run_id: str | None = None, size: int = 128) -> bytes:
        """Image ``index`` of an embedding run's ``files.txt`` as a small PNG."""
        params: dict[str, Any] = {"size": size}
        if run_id is not None:
            params["run_id"] = run_id
        return self._bytes(self.http.get(f"/v1/jobs/{job_id}/dataset-images/{index}", params=params))


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    event_id: str | None = None
    event_type = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data and event_id is not None:
                yield Event(int(event_id), event_type, json.loads("\n".join(data)))
            event_id, event_type, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = value
            elif field == "event":
                event_type = value
            elif field == "data":
                data.append(value)

