"""``simmim-service``: run the service (``serve``, ``worker``) and talk to it (``submit``, ``list``, …).

Client commands read ``SIMMIM_URL`` (default http://127.0.0.1:8000) and ``SIMMIM_API_KEY``.
Problems the user can fix print one line each and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from simmim.config import apply_overrides
from simmim.errors import ConfigError
from simmim_service.client import TERMINAL, APIError, SimMIMClient


def _client(args: argparse.Namespace) -> SimMIMClient:
    return SimMIMClient(args.url, api_key=args.api_key)


def cmd_serve(args: argparse.Namespace) -> int:
    from simmim_service.embedded import serve

    return serve(embedded=args.embedded, host=args.host, port=args.port, data_dir=Path(args.data_dir))


def cmd_worker(args: argparse.Namespace) -> int:
    from simmim_service.settings import Settings
    from worker.cli import visible_gpus, worker_main

    gpus: list[int] | None = None
    if args.gpus == "all":
        try:
            gpus = visible_gpus()
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif args.gpus:
        try:
            gpus = [int(g) for g in args.gpus.split(",")]
        except ValueError:
            print(f"error: --gpus takes 'all' or GPU indices like 0,1, got {args.gpus!r}", file=sys.stderr)
            return 2
    if args.gpus_per_worker < 1:
        print("error: --gpus-per-worker must be at least 1", file=sys.stderr)
        return 2
    return worker_main(queues=args.queues.split(","), gpus=gpus, concurrency=args.concurrency,
                       loglevel=args.loglevel, settings=Settings(), gpus_per_worker=args.gpus_per_worker)


def load_spec(path: str, overrides: list[str]) -> dict[str, Any]:
    """A job spec from YAML or JSON, with ``key.sub=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"spec file not found: {p}"])
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{p} is not valid YAML/JSON: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p} must hold a mapping with dataset and training"])
    return apply_overrides(raw, overrides)


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.create_job(load_spec(args.spec, args.set), idempotency_key=args.idempotency_key)
        print(json.dumps({"id": job["id"], "status": job["status"]}), flush=True)
        if args.watch:
            job = watch(client, job["id"])
            print(json.dumps(_summary(job), indent=2))
            return 0 if job["status"] == "succeeded" else 1
    return 0


def watch(client: SimMIMClient, job_id: str) -> dict[str, Any]:
    """A live progress bar (loss, img/s, ETA) from the job's event stream; returns the final job."""
    from tqdm import tqdm

    bar = tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        for event in client.events(job_id):
            if event.type == "status":
                bar.set_description(event.data["status"])
            elif event.type == "metrics":
                job = client.get_job(job_id)
                progress = job.get("progress") or {}
                bar.total = progress.get("total_steps") or bar.total
                bar.n = int(event.data.get("step", bar.n))
                bar.set_postfix(loss=f"{event.data.get('loss', float('nan')):.4f}",
                                img_s=f"{progress.get('images_per_sec', 0):.1f}",
                                eta=f"{progress.get('eta_seconds') or 0:.0f}s", refresh=False)
                bar.refresh()
            elif event.type == "log":
                bar.write(str(event.data.get("message", event.data)))
    finally:
        bar.close()
    return client.wait(job_id, timeout=60)


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "status", "error", "progress", "latest_metrics", "attempt", "created_at", "finished_at")
    return {k: job.get(k) for k in keys}


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.list_jobs(limit=args.limit, status=args.status, after=args.after)
    for job in page["data"]:
        step = (job.get("progress") or {}).get("step", "")
        print(f"{job['id']}  {job['status']:<10}  step {step!s:<7} {job.get('name') or ''}")
    if page.get("has_more"):
        print(f"... more: --after {page['data'][-1]['id']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(_summary(client.get_job(args.job_id)), indent=2))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id)
        if args.wait:
            job = client.wait(args.job_id, timeout=120)
    print(json.dumps({"id": job["id"], "status": job["status"]}))
    return 0 if job["status"] in TERMINAL | {"cancelling"} else 1


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ckpts = client.checkpoints(args.job_id)
        wanted = [c for c in ckpts if (c["id"] == args.what or (args.what == "encoder" and c["kind"] == "encoder")
                                      or (args.what == "latest" and c["kind"] == "checkpoint"))]
        if not wanted:
            raise ConfigError([f"job {args.job_id} has no {args.what!r} artifact; have: "
                               + ", ".join(c["id"] for c in ckpts)])
        ckpt = wanted[-1]
        out = Path(args.out)
        if out.is_dir():
            out = out / (f"{args.job_id}-encoder.safetensors" if ckpt["kind"] == "encoder" else f"{ckpt['id']}.pt")
        client.download(args.job_id, ckpt, out)
    print(json.dumps({"file": str(out), "sha256": ckpt["sha256"], "step": ckpt["step"]}))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.embed(args.job_id, [Path(f) for f in args.files], pooling=args.pooling,
                              layer=args.layer, normalize=args.normalize)
    if args.out:
        import numpy as np

        np.save(args.out, np.array([row["embedding"] for row in result["data"]], dtype=np.float32))
        print(json.dumps({"file": args.out, "count": len(result["data"]), "dim": result["dim"]}))
    else:
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simmim-service", description="SimMIM pretraining as a service.")
    parser.add_argument("--url", default=os.environ.get("SIMMIM_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("SIMMIM_API_KEY"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the API (with --embedded: and its workers, no servers needed)")
    p.add_argument("--embedded", action="store_true", help="SQLite + server-less broker + local workers")
    p.add_argument("--host", default=None, help="listen address (default: SIMMIM_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: SIMMIM_PORT, else 8000)")
    p.add_argument("--data-dir", default=".simmim", help="embedded mode: database, broker and artifacts")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run Celery workers (one process per GPU with --gpus)")
    p.add_argument("--queues", default="train,embed")
    p.add_argument("--gpus", default=None,
                   help="'all' or e.g. 0,1: one pinned training process per GPU (per group, see below)")
    p.add_argument("--gpus-per-worker", type=int, default=1, metavar="K",
                   help="GPUs per training process; it takes jobs with training.gpus up to K (DDP). "
                        "Without --gpus: CPU processes per job on a CPU-only worker")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("submit", help="submit a job spec (YAML/JSON with dataset and training)")
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--watch", action="store_true", help="follow progress until the job ends")
    p.add_argument("--idempotency-key", default=None)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--status", default=None)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", default=None)
    p.set_defaults(func=cmd_list)

    for name, func, helptext in (("status", cmd_status, "show one job"), ("cancel", cmd_cancel, "cancel a job")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job_id")
        if name == "cancel":
            p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
        p.set_defaults(func=func)

    p = sub.add_parser("download", help="download the encoder, the latest checkpoint, or one by id")
    p.add_argument("job_id")
    p.add_argument("what", nargs="?", default="encoder", help="encoder | latest | ckpt_…")
    p.add_argument("--out", default=".")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("embed", help="embeddings of local image files from a finished job")
    p.add_argument("job_id")
    p.add_argument("files", nargs="+")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--out", default=None, help="write embeddings to this .npy instead of printing JSON")
    p.set_defaults(func=cmd_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except APIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except httpx.HTTPError as err:
        print(f"error: cannot reach the service at {args.url}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
