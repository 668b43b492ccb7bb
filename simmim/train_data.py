"""The training data path as the engine sees it: a resumable stream of batches per epoch.

One DataLoader serves the whole run; its workers persist across epochs (``data.persistent_workers``)
because the sampler hands every worker ``(epoch, index)`` keys. With ``data.decode: gpu`` (the
default on CUDA) workers return JPEG bytes and crop parameters and the batch is decoded and
augmented on the training device (:mod:`simmim.data.gpu_decode`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from simmim.config import TrainConfig, steps_per_epoch
from simmim.data import (
    PretrainDataset,
    ResumableSampler,
    SimMIMAugment,
    build_pretrain_loader,
    default_num_workers,
    open_source,
)
from simmim.errors import DataError
from simmim.masking import MaskGenerator
from simmim.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """Dataset, sampler and loader settings for one process of a run."""

    dataset: PretrainDataset
    sampler: ResumableSampler
    batch_size: int
    num_workers: int
    pin_memory: bool
    steps_per_epoch: int
    persistent_workers: bool = False
    device: torch.device | None = None
    """Where batches are decoded when the dataset is ``encoded`` (data.decode: gpu)."""
    _loader: DataLoader | None = field(default=None, repr=False)

    @property
    def loader(self) -> DataLoader:
        """The run's DataLoader (built on first use)."""
        if self._loader is None:
            self._loader = build_pretrain_loader(
                self.dataset, self.sampler, self.batch_size, self.num_workers, self.pin_memory,
                persistent_workers=self.persistent_workers,
            )
        return self._loader

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Micro-batches of ``epoch`` from micro-batch ``start_batch`` on (for resume)."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        batches: Iterator[dict[str, Any]] = iter(self.loader)
        if self.dataset.encoded:
            from simmim.data.gpu_decode import DeviceAugment

            finish = DeviceAugment(self.dataset, self.device or torch.device("cpu"))
            return (finish(b) for b in batches)
        return batches

    def close(self) -> None:
        """Stop persistent loader workers (a no-op otherwise)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None) if loader is not None else None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def decode_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """``data.decode``: gpu/cpu as given; auto = on the device when it is CUDA."""
    if cfg.data.decode == "auto":
        return device.type == "cuda"
    return cfg.data.decode == "gpu"


def build_train_data(cfg: TrainConfig, mask_generator: MaskGenerator, rt: Runtime) -> TrainData:
    """Open the source and set up this rank's share of every epoch."""
    source = open_source(cfg.data.source, max_member_bytes=cfg.data.max_member_bytes,
                         allowed_roots=cfg.data.allowed_roots)
    o = cfg.optim
    per_epoch = steps_per_epoch(len(source), o.batch_size, rt.world_size, o.accumulation_steps)
    if per_epoch == 0:
        need = o.batch_size * rt.world_size * o.accumulation_steps
        raise DataError(
            f"{cfg.data.source} has {len(source)} images but one optimiser step needs {need} "
            "(batch_size x processes x accumulation_steps); lower optim.batch_size"
        )
    augment = SimMIMAugment(image_size=cfg.model.image_size)
    encoded = decode_on_device(cfg, rt.device)
    dataset = PretrainDataset(source, augment, mask_generator, seed=cfg.run.seed, encoded=encoded)
    sampler = ResumableSampler(len(source), o.batch_size, seed=cfg.run.seed,
                               rank=rt.rank, world_size=rt.world_size, with_epoch=True)
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_num_workers()
    return TrainData(dataset, sampler, o.batch_size, workers, rt.device.type == "cuda", per_epoch,
                     persistent_workers=cfg.data.persistent_workers, device=rt.device)
