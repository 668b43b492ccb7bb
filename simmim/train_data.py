"""The training data path as the engine sees it: a resumable stream of batches per epoch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


@dataclass
class TrainData:
    """Dataset, sampler and loader settings for one process of a run."""

    dataset: PretrainDataset
    sampler: ResumableSampler
    batch_size: int
    num_workers: int
    pin_memory: bool
    steps_per_epoch: int

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Micro-batches of ``epoch`` from micro-batch ``start_batch`` on (for resume)."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        loader: DataLoader = build_pretrain_loader(
            self.dataset, self.sampler, self.batch_size, self.num_workers, self.pin_memory
        )
        return iter(loader)


def build_train_data(cfg: TrainConfig, mask_generator: MaskGenerator, rt: Runtime) -> TrainData:
    """Open the source and set up this rank's share of every epoch."""
    source = open_source(cfg.data.source)
    o = cfg.optim
    per_epoch = steps_per_epoch(len(source), o.batch_size, rt.world_size, o.accumulation_steps)
    if per_epoch == 0:
        need = o.batch_size * rt.world_size * o.accumulation_steps
        raise DataError(
            f"{cfg.data.source} has {len(source)} images but one optimiser step needs {need} "
            "(batch_size x processes x accumulation_steps); lower optim.batch_size"
        )
    augment = SimMIMAugment(image_size=cfg.model.image_size)
    dataset = PretrainDataset(source, augment, mask_generator, seed=cfg.run.seed)
    sampler = ResumableSampler(len(source), o.batch_size, seed=cfg.run.seed,
                               rank=rt.rank, world_size=rt.world_size)
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_num_workers()
    return TrainData(dataset, sampler, o.batch_size, workers, rt.device.type == "cuda", per_epoch)
