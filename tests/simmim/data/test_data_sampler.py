"""ResumableSampler: rank splits, equal batch counts, exact resume, per-epoch shuffles."""

from __future__ import annotations

import pytest

from simmim.data.sampler import ResumableSampler
from simmim.errors import DataError


def _ranks(num: int, batch: int, world: int, epoch: int = 0) -> list[list[int]]:
    samplers = [
        ResumableSampler(num, batch, seed=3, rank=r, world_size=world) for r in range(world)
    ]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def test_ranks_are_disjoint_with_equal_whole_batches() -> None:
    per_rank = _ranks(num=103, batch=4, world=3)
    assert [len(indices) for indices in per_rank] == [32, 32, 32]  # 103 // 12 = 8 batches
    flat = [i for indices in per_rank for i in indices]
    assert len(set(flat)) == len(flat)
    assert set(flat) <= set(range(103))
    sampler = ResumableSampler(103, 4, seed=3, rank=1, world_size=3)
    assert sampler.batches_per_epoch == 8 and len(sampler) == 32


def test_resume_yields_exactly_the_tail() -> None:
    sampler = ResumableSampler(50, 4, seed=9, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start_batch=3)
    assert len(sampler) == len(full) - 12
    assert list(sampler) == full[12:]
    sampler.set_epoch(4, start_batch=sampler.batches_per_epoch)
    assert list(sampler) == [] and len(sampler) == 0


def test_epochs_differ_and_repeat_exactly() -> None:
    assert _ranks(64, 8, 1, epoch=0) != _ranks(64, 8, 1, epoch=1)
    assert _ranks(64, 8, 2, epoch=5) == _ranks(64, 8, 2, epoch=5)
    assert sorted(_ranks(64, 8, 1, epoch=2)[0]) == list(range(64))


def test_too_few_images_for_one_step() -> None:
    with pytest.raises(DataError) as info:
        ResumableSampler(10, batch_size=4, seed=0, world_size=3)
    message = str(info.value)
    assert "10 images" in message and "= 12" in message and "optim.batch_size" in message


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(100, 4, seed=0, rank=2, world_size=2)
    sampler = ResumableSampler(100, 4, seed=0)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(0, start_batch=26)
