"""The product end to end, as a user drives it: real HTTP, real Celery workers, real images.

Two deployments run the same scenario: the API in front of a worker process on a throwaway
Redis (as in docker-compose), and ``simmim-service serve --embedded`` (no servers at all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from simmim.atomic import sha256_file
from simmim_service.client import SimMIMClient
from tests.api.conftest import live_api
from tests.services import free_port, processes_using, redis_server, wait_until_ready
from tests.worker.stack import TINY_TRAINING, celery_worker, make_stack

ROOT = Path(__file__).resolve().parents[1]
KEY = "e2e-key"


def run_scenario(client: SimMIMClient, dataset: Path, test_images: list[Path], artifact_root: Path,
                 tmp: Path) -> None:
    """submit -> succeeded -> download (sha256) -> HTTP embeddings == `simmim embed`."""
    job = client.create_job({"name": "e2e", "dataset": str(dataset), "training": TINY_TRAINING})
    job = client.wait(job["id"], timeout=240, poll=0.3)
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == TINY_TRAINING["max_steps"]
    ckpts = client.checkpoints(job["id"])
    assert {c["kind"] for c in ckpts} == {"checkpoint", "encoder"}
    final = next(c for c in ckpts if c["kind"] == "checkpoint" and c["final"])
    assert final["step"] == TINY_TRAINING["max_steps"]
    path = client.download(job["id"], final, tmp / "final.pt")
    assert sha256_file(path) == final["sha256"]
    encoder = next(c for c in ckpts if c["kind"] == "encoder")
    client.download(job["id"], encoder, tmp / "encoder.safetensors")

    served = client.embed(job["id"], test_images)
    assert served["dim"] == 48 and len(served["data"]) == len(test_images)
    folder = tmp / "images"
    folder.mkdir()
    for i, image in enumerate(test_images):
        (folder / f"{i}.png").write_bytes(image.read_bytes())
    encoder_dir = artifact_root / "jobs" / job["id"] / "encoder"
    cli = subprocess.run([sys.executable, "-m", "simmim.cli", "-q", "embed", str(encoder_dir), str(folder),
                          "--out", str(tmp / "cli")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cli.returncode == 0, cli.stderr
    expected = np.load(json.loads(cli.stdout)["embeddings"])
    got = np.array([row["embedding"] for row in served["data"]])
    assert np.allclose(got, expected, atol=1e-4), np.abs(got - expected).max()


def run_cancel(client: SimMIMClient, dataset: Path) -> float:
    """Cancel a long job once it trains; returns seconds until it is ``cancelled``."""
    job = client.create_job({"dataset": str(dataset), "training": {**TINY_TRAINING, "max_steps": 5000}})
    deadline = time.monotonic() + 120
    while ((client.get_job(job["id"]).get("progress") or {}).get("step") or 0) < 2:
        assert time.monotonic() < deadline, client.get_job(job["id"])
        time.sleep(0.2)
    start = time.monotonic()
    client.cancel_job(job["id"])
    final = client.wait(job["id"], timeout=30, poll=0.1)
    assert final["status"] == "cancelled", final
    assert final["progress"]["step"] < 5000
    return time.monotonic() - start


@pytest.fixture(scope="module")
def test_images(digits: dict[str, Path]) -> list[Path]:
    return sorted(digits["test"].rglob("*.png"))[:5]


def test_api_and_worker_on_redis(digits: dict[str, Path], test_images: list[Path],
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("deploy")
    with redis_server(tmp) as redis_url:
        stack = make_stack(tmp, f"sqlite:///{tmp / 'jobs.db'}", redis_url)
        settings = stack.settings.model_copy(update={"api_keys": {KEY: "e2e"}, "auth_required": True,
                                                     "allowed_roots": [str(digits["train"].parent)]})
        stack.settings = settings
        try:
            with celery_worker(stack, "e2e"), live_api(settings) as api, \
                    SimMIMClient(api.url, api_key=KEY) as client:
                run_scenario(client, digits["train"], test_images, stack.artifacts, tmp)
                assert run_cancel(client, digits["train"]) < 10.0
        finally:
            stack.close()


@pytest.fixture
def embedded(tmp_path: Path, digits: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMMIM_ALLOWED_ROOTS": json.dumps([str(digits["train"].parent)]),
           "SIMMIM_PROGRESS_INTERVAL_S": "0", "SIMMIM_PORT": str(port)}  # the port from the environment
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "simmim_service.cli", "serve", "--embedded",
                             "--data-dir", str(tmp_path / "service")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc, tmp_path / "serve.log")
        yield url
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
        log.close()
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert processes_using(str(tmp_path / "service")) == [], "serve left worker processes behind"


def test_embedded_mode_same_scenario(embedded: str, digits: dict[str, Path], test_images: list[Path],
                                     tmp_path: Path) -> None:
    with SimMIMClient(embedded) as client:  # embedded on loopback: no key needed
        run_scenario(client, digits["train"], test_images, tmp_path / "service" / "artifacts", tmp_path)
        assert run_cancel(client, digits["train"]) < 10.0
    run_cli_commands(embedded, digits["train"], test_images, tmp_path)


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simmim_service.cli", "--url", url, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def run_cli_commands(url: str, dataset: Path, test_images: list[Path], tmp: Path) -> None:
    """``simmim-service submit --watch``, ``list``, ``status``, ``download``, ``embed`` and their errors."""
    spec = tmp / "job.yaml"
    spec.write_text(json.dumps({"dataset": str(dataset), "training": {**TINY_TRAINING, "max_steps": 4}}))
    done = cli(url, "submit", str(spec), "--watch", "--set", "name=from-cli")
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout.splitlines()[0])["id"]
    assert "succeeded" in done.stderr  # the progress bar's description
    assert json.loads(cli(url, "status", job_id).stdout)["status"] == "succeeded"
    listing = cli(url, "list", "--status", "succeeded").stdout
    assert job_id in listing and "from-cli" in listing
    got = cli(url, "download", job_id, "encoder", "--out", str(tmp))
    assert got.returncode == 0, got.stderr
    assert sha256_file(Path(json.loads(got.stdout)["file"])) == json.loads(got.stdout)["sha256"]
    emb = cli(url, "embed", job_id, *map(str, test_images[:2]), "--out", str(tmp / "cli.npy"))
    assert emb.returncode == 0 and np.load(tmp / "cli.npy").shape == (2, 48), emb.stderr
    bad = cli(url, "submit", str(spec), "--set", "training.image_size=33")
    assert bad.returncode == 2 and "training.mask_patch_size" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli(url, "status", "job_doesnotexist")
    assert missing.returncode == 2 and "404" in missing.stderr
    down = cli("http://127.0.0.1:9", "list")
    assert down.returncode == 2 and "cannot reach the service" in down.stderr
