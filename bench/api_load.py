"""API load and embedding overhead, against a real embedded service on loopback.

1. Status polling (``GET /v1/jobs/{id}``) and job listing (``GET /v1/jobs?limit=20``) under
   concurrent load: requests/s and p50/p99 latency. Bounded in request count and time.
2. The overhead of one HTTP embedding request of 32 images against calling the library
   (``simmim.embed.Embedder``) directly on the same images in this process: a ratio.

Run by hand: ``.venv/bin/python bench/api_load.py --out bench/results/api_load_cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from jobstore import repo
from jobstore.db import make_engine, session_factory
from simmim.sample_data import write_digits
from simmim_service.client import SimMIMClient

ROOT = Path(__file__).resolve().parents[1]

TRAINING = {"model": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4, "mask_patch_size": 8,
            "model_kwargs": {"depth": 6}, "batch_size": 32, "max_steps": 4, "warmup_steps": 1, "num_workers": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def hammer(url: str, paths: list[str], concurrency: int, max_requests: int, max_seconds: float) -> dict[str, Any]:
    """``concurrency`` clients issue GETs (cycling ``paths``) until the count or time bound."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.monotonic() + max_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued, errors
        while issued < max_requests and time.monotonic() < deadline:
            path = paths[issued % len(paths)]
            issued += 1
            t0 = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - t0)
            errors += response.status_code != 200

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 99) * 1000, 2)}


def seed_jobs(database_url: str, count: int) -> list[str]:
    """Insert ``count`` jobs straight into the store (listing and polling need rows, not training)."""
    sessions = session_factory(make_engine(database_url))
    ids = []
    with sessions.begin() as s:
        for i in range(count):
            job, _ = repo.create_job(s, tenant="local", spec={"dataset": "/x", "training": TRAINING}, name=f"load-{i}")
            ids.append(job.id)
    return ids


def embedding_overhead(client: SimMIMClient, job_id: str, encoder_dir: Path, images: list[Path],
                       repeats: int) -> dict[str, Any]:
    """Median seconds for 32 images: HTTP (API + broker + worker) vs the library in-process."""
    import torch
    from PIL import Image

    from simmim.embed import Embedder

    client.embed(job_id, images)  # warm the worker's encoder cache
    http = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client.embed(job_id, images)
        http.append(time.perf_counter() - t0)
    embedder = Embedder.load(encoder_dir)
    library = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = [embedder.transform(Image.open(p).convert("RGB")) for p in images]
        embedder.embed_tensors(torch.stack(batch))
        library.append(time.perf_counter() - t0)
    http_s, lib_s = statistics.median(http), statistics.median(library)
    return {"images": len(images), "repeats": repeats, "http_median_ms": round(http_s * 1000, 1),
            "library_median_ms": round(lib_s * 1000, 1), "http_over_library_ratio": round(http_s / lib_s, 2)}


def start_service(work: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIMMIM_ALLOWED_ROOTS": json.dumps([str(work)]),
           "SIMMIM_PROGRESS_INTERVAL_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "simmim_service.cli", "serve", "--embedded", "--port", str(port),
                             "--data-dir", str(work / "service")], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the embedded service did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs seeded into the store")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--embed-repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="api_load_"))
    digits = write_digits(work / "digits", size=32, limit=200)
    port = random.randint(20000, 40000)
    proc = start_service(work, port)
    url = f"http://127.0.0.1:{port}"
    try:
        with SimMIMClient(url) as client:
            job = client.wait(client.create_job({"dataset": str(digits["train"]), "training": TRAINING})["id"],
                              timeout=600, poll=0.5)
            assert job["status"] == "succeeded", job
            ids = seed_jobs(f"sqlite:///{work / 'service' / 'jobs.db'}", args.jobs)
            bounds = (args.concurrency, args.max_requests, args.max_seconds)
            status = asyncio.run(hammer(url, [f"/v1/jobs/{i}" for i in ids], *bounds))
            listing = asyncio.run(hammer(url, ["/v1/jobs?limit=20"], *bounds))
            images = sorted(digits["test"].rglob("*.png"))[:32]
            encoder_dir = work / "service" / "artifacts" / "jobs" / job["id"] / "encoder"
            overhead = embedding_overhead(client, job["id"], encoder_dir, images, args.embed_repeats)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    result = {"benchmark": "api_load", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "setup": {"mode": "embedded (SQLite store, SQLAlchemy broker)", "cpu_count": os.cpu_count(),
                        "seeded_jobs": args.jobs, "concurrency": args.concurrency,
                        "bounds": {"max_requests": args.max_requests, "max_seconds": args.max_seconds}},
              "status_polling": status, "job_listing": listing, "embedding_32_images": overhead}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
