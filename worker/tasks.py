"""The ``simmim.*`` Celery tasks. Thin: each one hands its ids to a task body.

Task contract (JSON arguments only; ids, never objects):

* ``simmim.pretrain(job_id)`` on queue ``train`` (``train.gpusN`` for N-GPU jobs): runs or resumes the job; status,
  progress, metrics, checkpoints and events go to the job store, not the result backend.
  Returns only the outcome word (``succeeded``, ``skipped``, ``requeued``, ...).
* ``simmim.embed(job_id, checkpoint_id, images_b64, pooling, layer, normalize)`` on queue
  ``embed``: returns ``{"embeddings", "dim", "checkpoint_id", "model"}``; raises
  ``ValueError`` for input the caller can fix, ``TimeoutError`` past ``embed_timeout_s``.
* ``simmim.embed_dataset(job_id, run_id)`` on queue ``embed``: fills an embedding run;
  returns the outcome word.

Library code (and torch) is imported inside the task bodies, in the pool process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_shutting_down

from worker import shutdown
from worker.celery_app import EMBED_DATASET_TASK, EMBED_TASK, PRETRAIN_TASK, train_queue
from worker.context import context_for

if TYPE_CHECKING:
    from worker.celery_app import SimMIMCelery

EMBED_HARD_LIMIT_MARGIN_S = 30.0


def register_tasks(app: SimMIMCelery) -> None:
    """Register the three tasks on ``app``; they run with ``app.settings``."""
    settings = app.settings

    def requeue(job_id: str, gpus: int = 1) -> None:
        app.send_task(PRETRAIN_TASK, args=[job_id], queue=train_queue(gpus))

    @app.task(name=PRETRAIN_TASK, bind=True, acks_late=True,
              reject_on_worker_lost=True)
    def pretrain(self: Task, job_id: str) -> str:
        """Run or resume pretraining job ``job_id`` (re-delivery safe: leased and fenced)."""
        from worker.training import run_pretrain

        # Again here, not only at process start: billiard's plain pool (used with polling
        # transports such as the embedded SQLite broker) resets classic signals to "exit" after
        # the process initialiser ran (see worker/shutdown.py).
        shutdown.install_child_handler()
        if shutdown.shutdown_requested():  # forked during a warm shutdown: leave it to the next worker
            raise Reject("this worker is shutting down", requeue=True)

        return run_pretrain(job_id, settings, worker_name=str(self.request.hostname), requeue=requeue)

    @app.task(name=EMBED_TASK, acks_late=True, reject_on_worker_lost=False,
              soft_time_limit=settings.embed_timeout_s,
              time_limit=settings.embed_timeout_s + EMBED_HARD_LIMIT_MARGIN_S)
    def embed(job_id: str, checkpoint_id: str | None = None, images_b64: list[str] | None = None,
              pooling: str = "mean", layer: int | None = None, normalize: bool = False) -> dict[str, Any]:
        """Embeddings of base64-encoded images with the job's encoder (or one checkpoint)."""
        from worker.embedding import embed_images

        try:
            return embed_images(context_for(settings), job_id=job_id, checkpoint_id=checkpoint_id,
                                images_b64=list(images_b64 or []), pooling=pooling, layer=layer,
                                normalize=normalize)
        except SoftTimeLimitExceeded:
            raise TimeoutError(f"embedding took longer than {settings.embed_timeout_s:g} s; "
                               "send fewer or smaller images per request") from None

    @app.task(name=EMBED_DATASET_TASK, acks_late=True, reject_on_worker_lost=True)
    def embed_dataset(job_id: str, run_id: str) -> str:
        """Embed a whole dataset into ``embeddings.npy`` + ``files.txt`` (run ``run_id``)."""
        from worker.embedding_runs import run_embed_dataset

        return run_embed_dataset(context_for(settings), job_id, run_id)


@worker_process_init.connect
def _on_pool_process_start(**_: Any) -> None:
    shutdown.install_child_handler()
    allow_child_processes()


def allow_child_processes() -> None:
    """Let a pool process start DataLoader workers.

    billiard marks pool processes as daemons, and Python refuses to let daemons have
    children ("daemonic processes are not allowed to have children"). The flag only
    matters for that check and for cleanup at exit, where DataLoader workers (themselves
    daemons) are still terminated with their parent.
    """
    from billiard.process import current_process

    current_process()._config["daemon"] = False


@worker_shutting_down.connect
def _on_worker_shutdown(**_: Any) -> None:
    shutdown.notify_children()
