"""The ``simmim.embed_dataset`` task body: embed a whole dataset with a job's encoder.

Writes ``embeddings.npy`` (float32, one row per image) and ``files.txt`` (the image names,
same order) under ``jobs/<job_id>/embeddings/<run_id>/`` in the artifact store and keeps
the run record (status, progress, count, failed names, keys) up to date. Re-running a run
is safe: outputs are rewritten atomically.

Run options (``EmbeddingRun.options``), all optional: ``checkpoint_id`` (default: the
exported encoder), ``pooling`` (``mean``/``cls``), ``layer``, ``normalize``, ``batch_size``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from jobstore import repo
from jobstore.states import TERMINAL, JobStatus
from simmim.errors import DataError
from simmim_service.artifacts import job_prefix
from worker.context import WorkerContext
from worker.datasets import dataset_path
from worker.embedding import BATCH_SIZE, POOLINGS, load_encoder

log = logging.getLogger(__name__)

MAX_TRIES = 3
"""Deliveries of one run before it is failed (a run that kills its worker is not retried forever)."""
PROGRESS_INTERVAL_S = 1.0


def run_embed_dataset(ctx: WorkerContext, job_id: str, run_id: str) -> str:
    """Run embedding run ``run_id``; returns ``succeeded``, ``failed``, ``skipped`` or ``missing``."""
    with ctx.transaction() as session:
        run = repo.get_embedding_run(session, job_id=job_id, run_id=run_id)
        if run is None:
            log.warning("embedding run %s of job %s does not exist", run_id, job_id)
            return "missing"
        if JobStatus(run.status) in TERMINAL:
            return "skipped"
        tries = int(run.progress.get("tries", 0)) + 1
        dataset, options = run.dataset, dict(run.options)
        repo.update_embedding_run(session, run_id=run_id, status=JobStatus.RUNNING,
                                  progress={"done": 0, "total": None, "tries": tries})
    if tries > MAX_TRIES:
        return _fail(ctx, run_id, f"the worker died {MAX_TRIES} times running this embedding run; "
                                  "it may need more memory than the worker has")
    try:
        _embed(ctx, job_id, run_id, dataset, options, tries)
    except (ValueError, DataError) as exc:
        return _fail(ctx, run_id, str(exc))
    except Exception as exc:
        log.error("embedding run %s failed", run_id, exc_info=exc)
        return _fail(ctx, run_id, f"internal error ({type(exc).__name__})")
    return "succeeded"


def _embed(ctx: WorkerContext, job_id: str, run_id: str, dataset: str, options: dict[str, Any],
           tries: int) -> None:
    from simmim.data import open_source
    from simmim.embed import save_embeddings

    pooling = options.get("pooling", "mean")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    settings = ctx.settings
    source = open_source(dataset_path(dataset, Path(settings.work_dir), settings.dataset_storage_options),
                         max_member_bytes=settings.max_archive_member_bytes, allowed_roots=settings.allowed_roots)
    embedder = load_encoder(ctx, job_id, options.get("checkpoint_id"))
    progress = _ProgressWriter(ctx, run_id, tries)
    result = embedder.embed_source(source, batch_size=int(options.get("batch_size") or BATCH_SIZE),
                                   pooling=pooling, layer=options.get("layer"),
                                   normalize=bool(options.get("normalize", False)), progress=progress)
    prefix = f"{job_prefix(job_id)}/embeddings/{run_id}"
    store = ctx.store
    out_dir = store.local_path(prefix) if store.is_local else Path(ctx.settings.work_dir).resolve() / prefix
    keys = {}
    for path in save_embeddings(result, out_dir):
        keys[path.name] = f"{prefix}/{path.name}"
        store.put_file(path, keys[path.name])
    total = len(result.names)
    with ctx.transaction() as session:
        repo.update_embedding_run(session, run_id=run_id, status=JobStatus.SUCCEEDED,
                                  embeddings_key=keys["embeddings.npy"], files_key=keys["files.txt"],
                                  count=total, failed=list(result.failed),
                                  progress={"done": total, "total": total, "tries": tries})


class _ProgressWriter:
    """``progress(done, total)`` callback writing to the run record at most every second."""

    def __init__(self, ctx: WorkerContext, run_id: str, tries: int) -> None:
        self.ctx, self.run_id, self.tries = ctx, run_id, tries
        self._written_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._written_at < PROGRESS_INTERVAL_S:
            return
        self._written_at = now
        with self.ctx.transaction() as session:
            repo.update_embedding_run(session, run_id=self.run_id,
                                      progress={"done": done, "total": total, "tries": self.tries})


def _fail(ctx: WorkerContext, run_id: str, message: str) -> str:
    with ctx.transaction() as session:
        repo.update_embedding_run(session, run_id=run_id, status=JobStatus.FAILED, error_message=message)
    return "failed"
