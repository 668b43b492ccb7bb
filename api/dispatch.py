"""How the API hands work to the workers: Celery task names, queues and payloads live here.

The worker side implements exactly these names:

=========================  ===================================  ========  =========================
task                       arguments                            queue     result
=========================  ===================================  ========  =========================
``simmim.pretrain``        args ``[job_id]``                    ``train``  ignored (progress goes
                                                                 or        to the job store)
                                                                 ``train.gpusN`` for N-GPU jobs
``simmim.embed_dataset``   args ``[job_id, run_id]``            ``embed``  ignored (job store)
``simmim.embed``           kwargs ``{job_id, checkpoint_id,     ``embed``  ``{embeddings, dim,
                           images_b64, pooling, layer,                     checkpoint_id, model}``
                           normalize}``
=========================  ===================================  ========  =========================

``simmim.embed`` raises ``ValueError`` for input the caller can fix (an undecodable image,
a layer out of range): the API answers 422 with its message. Any other exception is a 502.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import KombuError

from api.errors import BadGateway, GatewayTimeout, ServiceUnavailable, Unprocessable
from simmim_service.queues import (
    EMBED_DATASET_TASK,
    EMBED_QUEUE,
    EMBED_TASK,
    PRETRAIN_TASK,
    train_queue,
)
from simmim_service.settings import Settings

log = logging.getLogger("api.dispatch")


class Dispatcher(Protocol):
    """What the API needs from the task queue. Methods raise ``api.errors`` problems."""

    def enqueue_pretrain(self, job_id: str, gpus: int = 1) -> None:
        """Queue the training of a committed job on the queue for its GPU count;
        ``ServiceUnavailable`` when the broker is down."""

    def enqueue_embedding_run(self, job_id: str, run_id: str) -> None:
        """Queue a committed embedding run; ``ServiceUnavailable`` when the broker is down."""

    def embed(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Embed images now and wait for the answer (``GatewayTimeout``, ``Unprocessable``, ``BadGateway``)."""
        ...

    def ping(self) -> bool:
        """Whether the broker answers (quickly; used by ``/readyz``)."""
        ...


class CeleryDispatcher:
    """``Dispatcher`` over Celery: tasks sent by name, so the API never imports worker code."""

    def __init__(self, settings: Settings, *, connect_timeout: float = 2.0) -> None:
        self.connect_timeout = connect_timeout
        self.app = Celery("simmim-api", broker=settings.broker_url, backend=settings.result_backend,
                          set_as_current=False)
        retry = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
        self.app.conf.update(
            task_serializer="json", accept_content=["json"], result_serializer="json",
            result_accept_content=["json"], broker_connection_timeout=connect_timeout,
            task_publish_retry_policy=retry, redis_socket_connect_timeout=connect_timeout,
            result_backend_transport_options={"retry_policy": retry},
        )

    def _send(self, name: str, *, queue: str, args: list[Any] | None = None,
              kwargs: dict[str, Any] | None = None, ignore_result: bool = True) -> Any:
        try:
            return self.app.send_task(name, args=args, kwargs=kwargs, queue=queue, ignore_result=ignore_result)
        except (KombuError, OSError) as err:
            log.warning("could not send %s to queue %s: %s", name, queue, err)
            raise ServiceUnavailable(f"the task broker is unreachable ({type(err).__name__}); "
                                     "try again shortly", headers={"Retry-After": "5"}) from err

    def enqueue_pretrain(self, job_id: str, gpus: int = 1) -> None:
        self._send(PRETRAIN_TASK, queue=train_queue(gpus), args=[job_id])

    def enqueue_embedding_run(self, job_id: str, run_id: str) -> None:
        self._send(EMBED_DATASET_TASK, queue=EMBED_QUEUE, args=[job_id, run_id])

    def embed(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        result = self._send(EMBED_TASK, queue=EMBED_QUEUE, kwargs=payload, ignore_result=False)
        try:
            # interval: how often a database result backend is polled (Redis pushes instead)
            answer: dict[str, Any] = result.get(timeout=timeout, propagate=True, interval=0.02)
            return answer
        except CeleryTimeoutError as err:
            raise GatewayTimeout(f"no embedding worker answered within {timeout:g} s; "
                                 "is a worker consuming the 'embed' queue?") from err
        except ValueError as err:
            raise Unprocessable(f"the embedding worker refused the input: {err}") from err
        except TimeoutError as err:  # the worker's own embed_timeout_s ran out
            raise GatewayTimeout(f"the embedding worker gave up: {err}") from err
        except Exception as err:  # whatever the worker raised, the caller gets a 502
            log.warning("embedding task failed: %r", err)
            raise BadGateway(f"embedding worker failed ({type(err).__name__})") from err
        finally:
            _forget(result)

    def ping(self) -> bool:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                       timeout=self.connect_timeout)
            return True
        except (KombuError, OSError) as err:
            log.warning("broker ping failed: %s", err)
            return False

    def close(self) -> None:
        """Release broker and result-store connections."""
        self.app.close()


def _forget(result: Any) -> None:
    """Drop the stored result (it was delivered or will never be read)."""
    try:
        result.forget()
    except Exception as err:  # cleanup only
        log.debug("could not forget result %s: %s", result.id, err)
