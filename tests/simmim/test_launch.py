"""``simmim.launch.train_processes``: real gloo DDP processes started from inside Python."""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from simmim.checkpoint import CheckpointInfo, CheckpointManager
from simmim.engine import Progress, train
from simmim.errors import ConfigError, DataError, ImageDecodeError, NonFiniteLossError
from simmim.launch import RankFailedError, train_processes
from tests.conftest import tiny_config
from tests.services import alive


def test_two_processes_match_one_process_with_double_batch(digits: dict[str, Path], tmp_path: Path) -> None:
    one: list[Progress] = []
    train(tiny_config(digits["train"], tmp_path / "one", optim={"batch_size": 16, "max_steps": 4}),
          on_progress=one.append)
    two: list[Progress] = []
    saved: list[CheckpointInfo] = []
    pids: list[list[int]] = []
    cfg = tiny_config(digits["train"], tmp_path / "two", optim={"batch_size": 8, "max_steps": 4},
                      run={"checkpoint_every": 2})
    result = train_processes(cfg, 2, on_progress=two.append, on_checkpoint=saved.append, on_start=pids.append)

    assert result.steps == 4 and not result.stopped and result.encoder_dir is not None
    # Rank r takes every other image of the same permutation: together the same 16 images.
    assert [p.step for p in two] == [1, 2, 3, 4]
    assert np.allclose([p.loss for p in one], [p.loss for p in two], atol=1e-4)
    assert [c.step for c in saved] == [2, 4] and saved[-1].final
    assert len(pids[0]) == 2 and not any(alive(pid) for pid in pids[0])
    a = CheckpointManager(tmp_path / "one" / "checkpoints").load(CheckpointManager(tmp_path / "one" / "checkpoints").list()[-1])
    b = CheckpointManager(tmp_path / "two" / "checkpoints").load(saved[-1])
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-4), name


def test_ranks_agree_on_reports_by_time(digits: dict[str, Path], tmp_path: Path) -> None:
    """Reports by time under DDP: every rank reads the losses at the same steps, and the run ends.

    The ranks' clocks can end an interval at different steps (rarely here: the per-step
    all-reduce keeps them within a millisecond, so this cannot force a disagreement); the
    engine takes the MAX of their flags so none is left alone in the loss all-reduce.
    """
    seen: list[Progress] = []
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"batch_size": 8, "max_steps": 16},
                      run={"log_every": 1000, "log_interval_s": 0.05, "checkpoint_every": 1000})
    result = train_processes(cfg, 2, on_progress=seen.append)
    assert result.steps == 16 and not result.stopped
    steps = [p.step for p in seen]
    assert steps[-1] == 16 and steps == sorted(set(steps)) and len(steps) >= 2, steps


def test_stop_request_stops_every_rank_at_one_step_with_a_checkpoint(digits: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"batch_size": 8, "max_steps": 1000},
                      run={"checkpoint_every": 1000})
    seen: list[Progress] = []
    pids: list[int] = []
    result = train_processes(cfg, 2, on_progress=seen.append, on_start=pids.extend,
                             should_stop=lambda: bool(seen) and seen[-1].step >= 3)

    assert result.stopped and 3 <= result.steps < 1000
    assert result.checkpoint is not None and result.checkpoint.step == result.steps
    assert not any(alive(pid) for pid in pids)
    # Resuming continues from the stop checkpoint on both ranks.
    again = train_processes(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"max_steps": result.steps + 2})}),
                            2)
    assert again.resumed_from == result.steps and again.steps == result.steps + 2


def test_a_killed_rank_fails_the_run_and_takes_the_others_down(digits: dict[str, Path], tmp_path: Path,
                                                               record_property: Any) -> None:
    # recorded first: a test that fails counts what it exposed as lost (bench/faults.py)
    record_property("faults_injected", 1)
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"batch_size": 8, "max_steps": 100000},
                      run={"checkpoint_every": 100000})
    pids: list[int] = []
    seen: list[Progress] = []

    def kill_rank1_after_two_steps() -> bool:
        if len(seen) >= 2 and alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
        return False

    started = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 1 was killed by signal 9"):
        train_processes(cfg, 2, on_progress=seen.append, on_start=pids.extend, should_stop=kill_rank1_after_two_steps)
    assert time.monotonic() - started < 60
    assert not any(alive(pid) for pid in pids)


def test_an_error_in_a_rank_is_raised_with_its_type(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(empty, tmp_path / "run", optim={"batch_size": 8, "max_steps": 2})
    with pytest.raises(DataError, match="empty"):
        train_processes(cfg, 2)


@pytest.mark.parametrize("exc", [ConfigError(["a: bad", "b: worse"]), ImageDecodeError("x.png", "truncated"),
                                 NonFiniteLossError(3, float("inf"))])
def test_library_errors_survive_the_trip_between_processes(exc: Exception) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and back.__dict__ == exc.__dict__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_on_a_cpu_only_machine_is_refused_before_starting(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run", run={"device": "cuda"})
    with pytest.raises(ConfigError, match="cuda"):
        train_processes(cfg, 2)
