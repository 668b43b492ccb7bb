"""The Celery application: broker, queues, routes and delivery guarantees.

The app is built from a :class:`~simmim_service.settings.Settings` passed in by whoever
starts the process (``worker.app`` for ``celery -A``, tests, the API for sending), so
nothing reads the environment at import time. Importing this module never imports torch:
the parent worker process must not touch CUDA (tasks import the library lazily).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from simmim_service.queues import (
    EMBED_DATASET_TASK,
    EMBED_QUEUE,
    EMBED_TASK,
    PRETRAIN_TASK,
    TRAIN_QUEUE,
    train_queue,
    train_queues,
)
from simmim_service.settings import Settings

__all__ = ["EMBED_DATASET_TASK", "EMBED_QUEUE", "EMBED_TASK", "PRETRAIN_TASK", "TRAIN_QUEUE",
           "SimMIMCelery", "celery_config", "make_celery", "train_queue", "train_queues"]

ROUTES = {
    PRETRAIN_TASK: {"queue": TRAIN_QUEUE},
    EMBED_TASK: {"queue": EMBED_QUEUE},
    EMBED_DATASET_TASK: {"queue": EMBED_QUEUE},
}

VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
"""How long Redis keeps an unacknowledged message before handing it to another worker.

Training tasks are acknowledged only when they end (``acks_late``) and may run for days.
A job's liveness is tracked by *our* lease (the job store heartbeat), not by the broker,
so this timeout only needs to outlast the longest task: a shorter one would make Redis
re-deliver a healthy, still-running training job (harmless, since the lease refuses the
duplicate, but noisy). Crashed pool processes are re-queued at once by
``task_reject_on_worker_lost``; whole lost machines by the lease sweeper.
"""

RESULT_EXPIRES_S = 3600
"""Embedding results are fetched by the waiting API request right away."""


class SimMIMCelery(Celery):
    """A Celery app that carries the service settings its tasks run with."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__("simmim", **kwargs)
        self.settings = settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting the service relies on (see the module docstring for why)."""
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_track_started": True,
        "worker_prefetch_multiplier": 1,
        # Each queue has its own direct exchange and routing key (the queue's name), the
        # same binding Celery creates for a bare ``send_task(..., queue=name)``.
        # Training queues exist for every job size this deployment accepts (``train``,
        # ``train.gpus2``, ...); a worker consumes only those its devices can serve.
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q)
                        for q in [*train_queues(max(settings.max_job_gpus, settings.worker_gpus)), EMBED_QUEUE]],
        "task_default_queue": EMBED_QUEUE,
        "task_routes": ROUTES,
        "task_create_missing_queues": False,
        "result_expires": RESULT_EXPIRES_S,
        "broker_connection_retry_on_startup": True,
        # A broker blip must not kill a days-long training run; the lease prevents duplicates.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "timezone": "UTC",
        "enable_utc": True,
        # Polling transports (the embedded SQLAlchemy broker) check for messages this often;
        # the default of 1 s would add up to a second to every HTTP embedding request.
        "broker_polling_interval": 0.05,
    }
    if settings.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        config["broker_transport_options"] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    if settings.result_backend.startswith(("redis://", "rediss://", "sentinel://")):
        config["result_backend_transport_options"] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return config


def make_celery(settings: Settings) -> SimMIMCelery:
    """The Celery app for ``settings``, with the ``simmim.*`` tasks registered.

    Senders (the API) and workers use the same function, so routes and serialisation can
    never disagree. ``app.settings`` is what the tasks run with.
    """
    from worker.tasks import register_tasks

    app = SimMIMCelery(settings, set_as_current=False)
    app.conf.update(celery_config(settings))
    register_tasks(app)
    return app
