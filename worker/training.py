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
from worker.failures import classify, is_oom
from worker.faults import Faults
from worker.lease import JobLease, ProgressWriter
from worker.outputs import JobOutputs, sweep_finished_scratch
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


def report_cadence(progress_interval_s: float) -> dict[str, Any]:
    """``run`` settings that report progress about as often as the store takes it.

    Each report reads the loss back from the device (a host sync that drains the GPU's queue),
    so the engine reports by time, every ``progress_interval_s``, not every step; with an
    interval of 0 (every report stored) it reports every step.
    """
    if progress_interval_s <= 0:
        return {"log_every": 1, "log_interval_s": None}
    return {"log_every": 1_000_000_000, "log_interval_s": progress_interval_s}


class OutOfMemoryGaveUp(MemoryError):
    """Out of memory at the smallest micro-batch: nothing left to back off to."""


class PretrainAttempt:
    """One attempt at one job, from ``validating`` to a final status."""

    def __init__(self, ctx: WorkerContext, job_id: str, attempt: int, me: str,
                 requeue: Callable[[str, int], None] | None, shutdown: Callable[[], bool]) -> None:
        self.ctx, self.job_id, self.attempt, self.me = ctx, job_id, attempt, me
        self.requeue, self.shutdown = requeue, shutdown
        self.gpus = 1  # data-parallel processes; read from the spec when it is validated
        self.outputs = JobOutputs(ctx.store, job_id, ctx.settings.work_dir)
        self.faults = Faults.from_env()

    def execute(self) -> str:
        outcome = self._execute()
        if outcome in ("succeeded", "failed", "cancelled"):
            self._clean_scratch(outcome)
        return outcome

    def _clean_scratch(self, outcome: str) -> None:
        """On a remote store: upload what a failed or cancelled run logged, then free the disk."""
        if self.outputs.store.is_local:
            return
        if outcome != "succeeded":  # success published them already
            try:
                self._publish_logs()
            except Exception as err:  # the job has ended; a lost log file must not change that
                log.warning("job %s: could not upload its logs before deleting scratch: %s", self.job_id, err)
        if self.outputs.discard_scratch():
            log.info("job %s %s; deleted its scratch copy %s", self.job_id, outcome, self.outputs.directory)

        def finished(job_ids: list[str]) -> set[str]:
            with self.ctx.sessions() as session:
                return repo.finished_job_ids(session, job_ids=job_ids)

        try:  # copies of jobs that were handed back from here and finished elsewhere
            swept = sweep_finished_scratch(self.ctx.settings.work_dir, finished)
        except Exception as err:  # the store may be briefly unreachable; the next job sweeps again
            log.warning("could not sweep the scratch space of finished jobs: %s", err)
            return
        if swept:
            log.info("deleted the scratch copies of %d job(s) that finished elsewhere: %s", len(swept),
                     ", ".join(swept))

    def _publish_logs(self) -> None:
        for name in ("config.json", "metrics.jsonl"):
            if (self.outputs.directory / name).is_file():
                self.outputs.publish(self.outputs.directory / name)
        self.outputs.publish_tensorboard()

    def _execute(self) -> str:
        self._log("attempt started", worker=self.me)
        if is_crash_looping(self.ctx, self.job_id):
            return self._set_failed(ErrorCode.WORKER_LOST, (
                f"the worker running this job died {CRASH_LOOP_ATTEMPTS} times in a row before writing a "
                "checkpoint; it probably runs out of memory: lower training.batch_size or num_workers"))
        with self.ctx.sessions() as session:
            lost = repo.count_lost_attempts(session, job_id=self.job_id)
        if lost >= self.ctx.settings.max_lost_attempts:
            return self._set_failed(ErrorCode.WORKER_LOST, (
                f"the job lost its worker {lost} times (the machine or process died or stopped answering); "
                "giving up. Resubmit it to start over, or raise SIMMIM_MAX_LOST_ATTEMPTS"))
        # The lease beats from the start: fetching a remote dataset or checkpoint, and uploading
        # the outputs at the end, may take longer than lease_seconds.
        lease = JobLease(self.ctx, self.job_id, self.attempt, shutdown=self.shutdown)
        writer = ProgressWriter(self.ctx, lease)
        with lease:
            try:
                cfg = self._validate()
            except StaleAttemptError:
                raise
            except Exception as exc:
                return self._fail(exc)
            if not self._enter_running():
                return "cancelled"
            try:
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
            job = repo.get_job(session, job_id=self.job_id)
            raw_spec, overrides = job.spec, dict(job.overrides or {})
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
        source = open_source(location, max_member_bytes=settings.max_archive_member_bytes,
                             allowed_roots=settings.allowed_roots)
        check_sample(source, self.ctx.settings.max_image_pixels)
        cfg = train_config(spec.training, source=str(location), output_dir=str(self.outputs.directory))
        # The training processes open the source again: with the same limits as here.
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "max_member_bytes": settings.max_archive_member_bytes, "allowed_roots": list(settings.allowed_roots)})})
        if overrides:  # an earlier attempt backed off after running out of memory
            optim: dict[str, Any] = {k: overrides[k] for k in ("batch_size", "accumulation_steps") if k in overrides}
            cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update=optim)})
        need = cfg.optim.batch_size * cfg.optim.accumulation_steps * self.gpus
        if len(source) < need:
            raise DataError(f"{spec.dataset} has {len(source)} images but one optimiser step needs {need} "
                            "(batch_size x accumulation_steps x gpus); add images or lower training.batch_size")
        self._restore_remote_checkpoint()
        return cfg.model_copy(update={"run": cfg.run.model_copy(update=report_cadence(settings.progress_interval_s))})

    def _restore_remote_checkpoint(self) -> None:
        """On a remote store, bring the run directory up to the newest recorded checkpoint.

        Also when this host ran an earlier attempt and kept older checkpoints: it must not
        retrain the steps another host has trained since.
        """
        with self.ctx.sessions() as session:
            records = [(c.step, c.uri, c.sha256) for c in repo.list_checkpoints(session, job_id=self.job_id)
                       if c.kind == "checkpoint"]
        self.outputs.restore_newest(records)  # nothing to do on a local store

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

        existing = CheckpointManager(self.outputs.directory / "checkpoints").list()
        if existing:
            self._log(f"resuming from the checkpoint at step {existing[-1].step}", step=existing[-1].step)
        self.faults.install_checkpoint_fault(self.job_id)
        tried: list[tuple[int, int]] = []
        while True:
            tried.append((cfg.optim.batch_size, cfg.optim.accumulation_steps))
            try:
                return self._train_once(cfg, lease, writer)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                cfg = self._back_off(cfg, exc, tried)

    def _back_off(self, cfg: TrainConfig, exc: Exception, tried: list[tuple[int, int]]) -> TrainConfig:
        """After an out-of-memory error: the same total batch in smaller micro-batches, or give up.

        The micro-batch is divided by its smallest factor (halved when even) and gradient
        accumulation multiplied by it, so the optimisation is unchanged; training resumes
        from the last checkpoint. The identical configuration is never retried.
        """
        import gc

        import torch

        batch, accum = cfg.optim.batch_size, cfg.optim.accumulation_steps
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        factor = next((f for f in range(2, batch + 1) if batch % f == 0), None)
        if factor is None:
            shown = ", ".join(f"{b}x{a}" for b, a in tried)
            raise OutOfMemoryGaveUp(
                f"out of memory even with a micro-batch of 1 (tried batch_size x accumulation_steps {shown}); "
                "use a smaller image_size or model, precision=bf16, or a GPU with more memory") from exc
        smaller = {"batch_size": batch // factor, "accumulation_steps": accum * factor}
        with self.ctx.transaction() as session:
            repo.set_overrides(session, job_id=self.job_id, attempt=self.attempt,
                               overrides={**smaller, "reason": "out of memory"})
        self._log(f"out of memory with micro-batch {batch}; resuming from the last checkpoint with micro-batch "
                  f"{smaller['batch_size']} x {smaller['accumulation_steps']} accumulation steps (same total batch)",
                  level="warning", **smaller)
        return cfg.model_copy(update={"optim": cfg.optim.model_copy(update=smaller)})

    def _train_once(self, cfg: TrainConfig, lease: JobLease, writer: ProgressWriter) -> TrainResult:
        from simmim.engine import train

        progress = self.faults.wrap_progress(self.job_id, cfg.optim.batch_size, writer)
        if self.gpus == 1:
            return train(cfg, on_progress=progress, should_stop=lease.should_stop,
                         on_checkpoint=self._record_checkpoint, resume=True)
        from simmim.launch import train_processes

        def started(pids: list[int]) -> None:
            self._log(f"training with {self.gpus} data-parallel processes", pids=pids, gpus=self.gpus)

        return train_processes(cfg, self.gpus, on_progress=progress, should_stop=lease.should_stop,
                               on_checkpoint=self._record_checkpoint, resume=True, on_start=started,
                               stop_grace_s=self.ctx.settings.cancel_grace_s)

    def _record_checkpoint(self, info: CheckpointInfo) -> None:
        """Upload (remote stores) and record a checkpoint the engine just saved."""
        key = self.outputs.key(info.path)
        if self._is_recorded(key, info.sha256):
            return
        self._still_mine()  # a superseded attempt must not overwrite the new one's files
        self.outputs.publish_preview(info.step)
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

    def _still_mine(self) -> None:
        """Raise ``StaleAttemptError`` unless this attempt still owns the job (a fenced heartbeat)."""
        with self.ctx.transaction() as session:
            repo.heartbeat(session, job_id=self.job_id, attempt=self.attempt)

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
        self._publish_logs()
        if result.encoder_dir is None:
            return
        weights = Path(result.encoder_dir) / "encoder.safetensors"
        config = Path(result.encoder_dir) / "config.json"
        sha256 = json.loads(config.read_text())["weights_sha256"]
        key = self.outputs.key(weights)
        if self._is_recorded(key, sha256):
            return
        self._still_mine()
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
