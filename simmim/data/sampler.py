"""A distributed, resumable sampler: each epoch's order is a pure function of (seed, epoch).

Resuming mid-epoch only needs the epoch and how many batches this process already took;
the remaining indices are exactly the tail the uninterrupted run would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from simmim.errors import DataError


class ResumableSampler(Sampler[Any]):
    """Shuffles indices per epoch, splits them across processes, and can skip ahead.

    Each epoch shuffles ``range(num_samples)`` with a generator seeded by
    ``SeedSequence([seed, epoch])``, drops the tail that would not give every process the
    same whole number of batches, and gives rank ``r`` every ``world_size``-th index starting
    at ``r`` (a strided split, so ranks stay disjoint). The dropped tail changes every epoch.

    Args:
        num_samples: Images in the dataset.
        batch_size: Images per process per micro-batch (the DataLoader's batch size).
        seed: The run's seed.
        rank: This process's rank.
        world_size: Number of processes.
        with_epoch: Yield ``(epoch, index)`` pairs instead of indices, so that persistent
            DataLoader workers (which keep their copy of the dataset, and its epoch, from the
            first epoch) still draw each sample's randomness from the current epoch.

    Raises:
        DataError: If the dataset cannot fill one batch on every process.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        with_epoch: bool = False,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size "
                f"(got batch_size={batch_size}, rank={rank}, world_size={world_size})"
            )
        per_step = batch_size * world_size
        if num_samples // per_step == 0:
            raise DataError(
                f"dataset has {num_samples} images but one step needs batch_size*world_size = "
                f"{per_step}; lower optim.batch_size or add images"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        self.with_epoch = with_epoch

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches each process gets per epoch (the same on every rank)."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and how many of this rank's batches to skip (for resume).

        Raises:
            ValueError: If ``start_batch`` is outside ``[0, batches_per_epoch]``.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch must be between 0 and {self.batches_per_epoch} (got {start_batch})"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_indices(self) -> list[int]:
        """All of this rank's indices for the current epoch, ignoring ``start_batch``."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        order = rng.permutation(self.num_samples)
        used = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        return used[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[Any]:
        indices = self.epoch_indices()[self.start_batch * self.batch_size :]
        if self.with_epoch:
            epoch = self.epoch
            yield from ((epoch, i) for i in indices)
        else:
            yield from indices

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
