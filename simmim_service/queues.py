"""Task names and queues: the whole contract between the API (which sends) and the workers.

Training jobs are routed by how many devices they need. A job with ``training.gpus = N``
goes to :func:`train_queue` ``(N)``; a worker process that owns ``G`` devices consumes the
queues for ``1..G`` (:func:`train_queues`), so a worker is only ever handed a job it has
enough GPUs for, and a 1-GPU worker never sees a 4-GPU job.
"""

from __future__ import annotations

PRETRAIN_TASK = "simmim.pretrain"
EMBED_TASK = "simmim.embed"
EMBED_DATASET_TASK = "simmim.embed_dataset"

TRAIN_QUEUE = "train"
EMBED_QUEUE = "embed"


def train_queue(gpus: int) -> str:
    """The queue of training jobs that need ``gpus`` devices (``train`` for one)."""
    if gpus < 1:
        raise ValueError(f"a job needs at least one device, got {gpus}")
    return TRAIN_QUEUE if gpus == 1 else f"{TRAIN_QUEUE}.gpus{gpus}"


def train_queues(devices: int) -> list[str]:
    """Every training queue a worker owning ``devices`` devices can serve."""
    return [train_queue(n) for n in range(1, devices + 1)]
