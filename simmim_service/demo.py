"""The main job: the embedded service end to end on a real small dataset.

Starts ``simmim-service serve --embedded`` (SQLite, a server-less broker, local workers),
submits a SimMIM job on scikit-learn's digits written as PNG files, follows its progress,
downloads the encoder (sha256-verified), asks the service for embeddings of a few test
images over HTTP, and shuts the service down. Run it with ``./dev demo``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from simmim_service.cli import watch
from simmim_service.client import SimMIMClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Poll /readyz until the service (store, broker, artifacts) is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the service exited early with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the service did not become ready in time")


def job_spec(train_dir: Path, epochs: int) -> dict[str, object]:
    """A small ViT on 32 px digits: 8 px mask blocks over 4 px patches (see configs/)."""
    return {
        "name": "digits-vit-tiny",
        "dataset": str(train_dir),
        "training": {"model": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4,
                     "mask_patch_size": 8, "model_kwargs": {"depth": 6}, "batch_size": 64,
                     "base_lr": 1e-3, "epochs": epochs, "warmup_epochs": 1, "checkpoint_every": 100,
                     "num_workers": 1},
        "metadata": {"source": "scikit-learn digits"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default=str(ROOT / ".demo"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    work = Path(args.workdir).resolve()

    from simmim.sample_data import write_digits

    print(f"== writing scikit-learn digits as 32 px PNGs under {work / 'digits'}", flush=True)
    splits = write_digits(work / "digits", size=32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"== starting the embedded service on {url} (data in {work / 'service'})", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "simmim_service.cli", "serve", "--embedded", "--port",
                               str(port), "--data-dir", str(work / "service")],
                              env={**os.environ, "SIMMIM_ALLOWED_ROOTS": f'["{work}"]'})
    try:
        wait_ready(url, server)
        run(SimMIMClient(url), splits, work, args.epochs)
    finally:
        server.terminate()
        server.wait(timeout=60)


def run(client: SimMIMClient, splits: dict[str, Path], work: Path, epochs: int) -> None:
    job = client.create_job(job_spec(splits["train"], epochs))
    print(f"== submitted {job['id']}; following its progress", flush=True)
    job = watch(client, job["id"])
    print(f"job {job['id']} {job['status']} after {(job.get('progress') or {}).get('step')} steps; "
          f"final loss {(job.get('latest_metrics') or {}).get('loss')}")
    if job["status"] != "succeeded":
        sys.exit(f"job ended {job['status']}: {job.get('error')}")
    encoder = next(c for c in client.checkpoints(job["id"]) if c["kind"] == "encoder")
    out = client.download(job["id"], encoder, work / "encoder.safetensors")
    print(f"== downloaded the encoder to {out} (sha256 {encoder['sha256'][:16]}… verified)")
    images = sorted(splits["test"].rglob("*.png"))[:4]
    result = client.embed(job["id"], images)
    print(f"== embeddings over HTTP ({result['dim']} dims, mean-pooled patch tokens)")
    for path, row in zip(images, result["data"], strict=True):
        values = ", ".join(f"{v:+.3f}" for v in row["embedding"][:6])
        print(f"{path.parent.name}/{path.name}: [{values}, ...]")


if __name__ == "__main__":
    main()
