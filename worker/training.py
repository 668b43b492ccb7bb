"""The ``simmim.pretrain`` task body: claim, validate, train under a lease, record, finish.

Every write is fenced by the attempt number: ``StaleAttemptError`` anywhere means a newer
attempt owns the job, and this one stops without touching it again. The library (and so
torch) is imported only inside the functions that train, never in the parent worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobstore import repo
from jobstore.repo import InvalidTransitionError, StaleAttemptError
from jobstore.states import ErrorCode, JobStatus
from simmim.errors import ConfigError, DataError
from simmim_service.settings import Settings
from simmim_service.spec import JobCreate, check_training, train_config
from worker.claim import CRASH_LOOP_ATTEMPTS, claim, is_crash_looping, worker_identity
from worker.context import WorkerContext, context_for
from worker.datasets import check_sample, dataset_path
from worker.failures import classify
from worker.lease import JobLease, ProgressWriter
from worker.outputs import JobOutputs
from worker.shutdown import shutdown_requested

if TYPE_CHECKING:
    from simmim.checkpoint import CheckpointInfo
    from simmim.config import TrainConfig
    from simmim.engine import TrainResult

log = logging.getLogger(__name__)

def run_pretrain(job_id: str, settings: Settings, worker_name: str, *,
                 requeue: Callable[[str, int], None] | None = None,
                 shutdown: Callable[[], bool] = shutdown_requested) -> str:
    """Run (or resume) the pretraining job ``job_id`` to an outcome.

    Args:
        job_id: The job to run; its spec is read from the job store.
        settings: Service settings (store URLs, lease length, progress throttle).
        worker_name: The Celery node name, e.g. ``train-gpu0@host``.
        requeue: Sends the job (id, GPU count) back to its train queue (used when the worker shuts down).
        shutdown: Whether this process is shutting down (checked after every step).

    Returns:
        ``skipped`` (finished, or owned by a live attempt), ``succeeded``, ``failed``,
        ``cancelled``, ``requeued`` or ``superseded`` (a newer attempt took over).
    """
    ctx = context_for(settings)
    me = worker_identity(worker_name)
    attempt = claim(ctx, job_id, me)
    if attempt is None:
        log.info("job %s is finished or owned by a live attempt; nothing to do", job_id)
        return "skipped"
    try:
        return PretrainAttempt(ctx, job_id, attempt, me, requeue, shutdown).execute()
    except StaleAttemptError:
        log.warning("job %s: attempt %d was superseded by a newer attempt; stopped", job_id, attempt)
        return "superseded"


class PretrainAttempt:
    """One attempt at one job, from ``validating`` to a final status."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt: int, me: str,
                 requeue: Callable[[str, int], None] | None, shutdown: Callable[[], bool]) -> None:
        self.ctx, self.job_id, self.attempt, self.me = ctx, job_id, attempt, me
        self.requeue, self.shutdown = requeue, shutdown
        self.gpus = 1  # data-parallel processes; read from the spec when it is validated
        self.outputs = JobOutputs(ctx.store, job_id, ctx.settings.work_dir)

    def execute(self) -> str:
        self._log("attempt started", worker=self.me)
        if is_crash_looping(self.ctx, self.job_id):
            return self._set_failed(ErrorCode.WORKER_LOST, (
                f"the worker running this job died {CRASH_LOOP_ATTEMPTS} times in a row before writing a "
                "checkpoint; it probably runs out of memory: lower training.batch_size or num_workers"))
        try:
            cfg = self._validate()
        except Exception as exc:
            return self._fail(exc)
        if not self._enter_running():
            return "cancelled"
        lease = JobLease(self.ctx, self.job_id, self.attempt, shutdown=self.shutdown)
        writer = ProgressWriter(self.ctx, lease)
        try:
            with lease:
                result = self._train(cfg, lease, writer)
                writer.flush()
        except StaleAttemptError:
            raise
        except Exception as exc:
            return self._fail(exc)
        return self._finish(result, lease)

    # validating -------------------------------------------------------------------------

    def _validate(self) -> TrainConfig:
        from simmim.data import open_source

        with self.ctx.sessions() as session:
            raw_spec = repo.get_job(session, job_id=self.job_id).spec
        spec = JobCreate.model_validate(raw_spec)
        self.gpus = spec.training.gpus
        owned = self.ctx.settings.worker_gpus  # SIMMIM_WORKER_GPUS, set by `simmim-service worker`
        if self.gpus > owned:  # only a hand-started worker consuming the wrong queue gets here
            raise ConfigError([f"training.gpus: the job needs {self.gpus} GPU(s) but this worker owns "
                               f"{owned}; it consumed a queue meant for larger workers"])
        if problems := check_training(spec.training):
            raise ConfigError([f"{p['field']}: {p['message']}" for p in problems])
        settings = self.ctx.settings
        location = dataset_path(spec.dataset, Path(settings.work_dir), settings.dataset_storage_options)
        source = open_source(location)
        check_sample(source, self.ctx.settings.max_image_pixels)
        cfg = train_config(spec.training, source=str(location), output_dir=str(self.outputs.directory))
        need = cfg.optim.batch_size * cfg.optim.accumulation_steps * self.gpus
        if len(source) < need:
            raise DataError(f"{spec.dataset} has {len(source)} images but one optimiser step needs {need} "
                            "(batch_size x accumulation_steps x gpus); add images or lower training.batch_size")
        self._restore_remote_checkpoint()
        # Report every step: the worker throttles what reaches the store by time instead.
        return cfg.model_copy(update={"run": cfg.run.model_copy(update={"log_every": 1})})

    def _restore_remote_checkpoint(self) -> None:
        """On a remote store, fetch the newest recorded checkpoint so training resumes from it."""
        if self.ctx.store.is_local or any((self.outputs.directory / "checkpoints").glob("ckpt_*.json")):
            return
        with self.ctx.sessions() as session:
            records = [c for c in repo.list_checkpoints(session, job_id=self.job_id)
                       if c.kind == "checkpoint"]
        for record in sorted(records, key=lambda c: c.step, reverse=True):
            if self.outputs.restore_checkpoint(record.uri):
                return

    def _enter_running(self) -> bool:
        """``validating -> running``, or ``cancelled`` if a cancel arrived meanwhile."""
        with self.ctx.transaction() as session:
            cancel = repo.heartbeat(session, job_id=self.job_id, attempt=self.attempt)
            target = JobStatus.CANCELLED if cancel else JobStatus.RUNNING
            repo.set_status(session, job_id=self.job_id, attempt=self.attempt, status=target)
        return not cancel

    # running ----------------------------------------------------------------------------

    def _train(self, cfg: TrainConfig, lease: JobLease, writer: ProgressWriter) -> TrainResult:
        from simmim.checkpoint import CheckpointManager
        from simmim.engine import train

        existing = CheckpointManager(self.outputs.directory / "checkpoints").list()
        if existing:
            self._log(f"resuming from the checkpoint at step {existing[-1].step}", step=existing[-1].step)
        if self.gpus == 1:
            return train(cfg, on_progress=writer, should_stop=lease.should_stop,
                         on_checkpoint=self._record_checkpoint, resume=True)
        from simmim.launch import train_processes

        def started(pids: list[int]) -> None:
            self._log(f"training with {self.gpus} data-parallel processes", pids=pids, gpus=self.gpus)

        return train_processes(cfg, self.gpus, on_progress=writer, should_stop=lease.should_stop,
                               on_checkpoint=self._record_checkpoint, resume=True, on_start=started,
                               stop_grace_s=self.ctx.settings.lease_seconds)

    def _record_checkpoint(self, info: CheckpointInfo) -> None:
        """Upload (remote stores) and record a checkpoint the engine just saved."""
        key = self.outputs.key(info.path)
        if self._is_recorded(key, info.sha256):
            return
        self.outputs.publish_checkpoint(info.path)
        self._record(key, step=info.step, sha256=info.sha256, size=info.size, final=info.final,
                     kind="checkpoint")
        self._forget_pruned(info.path.parent)

    def _forget_pruned(self, directory: Path) -> None:
        """Drop store rows of checkpoints the trainer has pruned (keep_last) or re-saved."""
        from simmim.checkpoint import CheckpointManager

        keep = {(self.outputs.key(c.path), c.sha256) for c in CheckpointManager(directory).list()}
        with self.ctx.transaction() as session:
            repo.forget_checkpoints(session, job_id=self.job_id, attempt=self.attempt, keep=keep)

    def _is_recorded(self, key: str, sha256: str) -> bool:
        """Whether this exact file (key and content) is already recorded, e.g. by an earlier attempt."""
        with self.ctx.sessions() as session:
            known = repo.list_checkpoints(session, job_id=self.job_id)
        return any(c.uri == key and c.sha256 == sha256 for c in known)

    def _record(self, key: str, *, step: int, sha256: str, size: int, final: bool, kind: str) -> None:
        with self.ctx.transaction() as session:
            repo.add_checkpoint(session, job_id=self.job_id, attempt=self.attempt, step=step, uri=key,
                                sha256=sha256, size=size, final=final, kind=kind)

    # finishing --------------------------------------------------------------------------

    def _finish(self, result: TrainResult, lease: JobLease) -> str:
        if result.stopped and lease.cancel_requested:
            self._log(f"cancelled at step {result.steps}; checkpoint kept", step=result.steps)
            return self._set(JobStatus.CANCELLED, "cancelled")
        if result.stopped:
            return self._hand_back(result)
        self._record_outputs(result)
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        self._log(f"finished {result.steps} steps, final loss {loss}", step=result.steps)
        return self._set(JobStatus.SUCCEEDED, "succeeded")

    def _record_outputs(self, result: TrainResult) -> None:
        """The final checkpoint (if an earlier attempt did not record it) and the encoder."""
        if result.checkpoint is not None:
            self._record_checkpoint(result.checkpoint)
        for name in ("config.json", "metrics.jsonl"):
            if (self.outputs.directory / name).is_file():
                self.outputs.publish(self.outputs.directory / name)
        if result.encoder_dir is None:
            return
        weights = Path(result.encoder_dir) / "encoder.safetensors"
        config = Path(result.encoder_dir) / "config.json"
        sha256 = json.loads(config.read_text())["weights_sha256"]
        key = self.outputs.key(weights)
        if self._is_recorded(key, sha256):
            return
        self.outputs.publish(weights)
        self.outputs.publish(config)
        self._record(key, step=result.steps, sha256=sha256, size=weights.stat().st_size, final=True,
                     kind="encoder")

    def _hand_back(self, result: TrainResult) -> str:
        """The worker is shutting down: leave the job ``recovering`` and re-queue it."""
        self._log(f"worker shutting down; checkpointed at step {result.steps} and re-queued the job",
                  step=result.steps)
        try:
            self._set(JobStatus.RECOVERING, "requeued")
        except InvalidTransitionError:  # a cancel arrived after the last check
            return self._set(JobStatus.CANCELLED, "cancelled")
        if self.requeue is not None:
            self.requeue(self.job_id, self.gpus)
        return "requeued"

    def _fail(self, exc: Exception) -> str:
        code, message = classify(exc)
        if code == ErrorCode.INTERNAL:
            log.error("job %s failed", self.job_id, exc_info=exc)
        else:
            log.warning("job %s failed (%s): %s", self.job_id, code, message)
        return self._set_failed(code, message)

    def _set_failed(self, code: ErrorCode, message: str) -> str:
        self._log(message, level="error")
        with self.ctx.transaction() as session:
            repo.set_status(session, job_id=self.job_id, attempt=self.attempt, status=JobStatus.FAILED,
                            error_code=code, error_message=message)
        return "failed"

    def _set(self, status: JobStatus, outcome: str) -> str:
        with self.ctx.transaction() as session:
            repo.set_status(session, job_id=self.job_id, attempt=self.attempt, status=status)
        return outcome

    def _log(self, message: str, level: str = "info", **data: Any) -> None:
        """A ``log`` event, written only while this attempt still owns the job."""
        with self.ctx.transaction() as session:
            repo.heartbeat(session, job_id=self.job_id, attempt=self.attempt)
            repo.add_event(session, job_id=self.job_id, type="log",
                           data={"message": message, "level": level, "attempt": self.attempt, **data})
