"""The pretraining DataLoader: worker count, batching and the collate function."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MAX_DEFAULT_WORKERS = 8


def default_num_workers() -> int:
    """min(8, usable CPUs); 0 (load in the main process) when only one CPU is usable."""
    try:
        cpus = len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
    except AttributeError:  # not available on macOS / Windows
        cpus = os.cpu_count() or 1
    return 0 if cpus <= 1 else min(_MAX_DEFAULT_WORKERS, cpus)


_ENCODED_KEYS = ("jpeg", "box", "flip", "image", "epoch", "key_index")


def collate_pretrain(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch.

    Returns:
        ``image`` float32 (B,3,S,S), ``mask`` uint8 (B,G,G) when samples have masks,
        ``index`` int64 (B,), and ``skipped`` (int): unreadable images skipped for this batch.
        When some samples are still encoded (``PretrainDataset(encoded=True)``), ``encoded``
        (a list, per sample, of its ``jpeg``/``box``/``flip`` or ``image``, plus ``epoch`` and
        ``key_index``) replaces ``image``; :class:`~simmim.data.gpu_decode.DeviceAugment`
        turns such a batch into a normal one on the device.
    """
    batch: dict[str, Any] = {
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "skipped": sum(int(s["skipped"]) for s in samples),
    }
    if all("image" in s for s in samples):
        batch["image"] = torch.stack([s["image"] for s in samples])
    else:
        batch["encoded"] = [{k: s[k] for k in _ENCODED_KEYS if k in s} for s in samples]
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    return batch


def build_pretrain_loader(
    dataset: Dataset[dict[str, Any]],
    sampler: Sampler[int],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool = False,
) -> DataLoader[dict[str, Any]]:
    """DataLoader for :class:`~simmim.data.dataset.PretrainDataset` batches.

    Incomplete batches are dropped (every step sees ``batch_size`` images). With
    ``persistent_workers`` the workers live as long as the loader; their copy of the dataset
    keeps the epoch it had when they started, so the sampler must carry the epoch in each key
    (``ResumableSampler(with_epoch=True)``). Otherwise each epoch's iterator copies the
    dataset with its current epoch (see ``PretrainDataset.set_epoch``).

    Args:
        dataset: Yields sample dicts (``image``, ``index``, ``skipped``, optional ``mask``).
        sampler: Decides the order; with ResumableSampler its batch size must match.
        batch_size: Images per process per micro-step.
        num_workers: Loader processes; 0 loads in the main process.
        pin_memory: Pin batches in page-locked memory for faster host-to-GPU copies.
        persistent_workers: Keep the worker processes between iterators (epochs).

    Raises:
        ValueError: If the sampler was built for a different batch size.
    """
    sampler_batch = getattr(sampler, "batch_size", batch_size)
    if sampler_batch != batch_size:
        raise ValueError(
            f"the sampler was built for batch_size={sampler_batch} but the loader got "
            f"batch_size={batch_size}; pass the same per-process batch size to both"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_pretrain,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
