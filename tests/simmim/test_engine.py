import json
import time
from pathlib import Path

import pytest
import torch

from simmim.checkpoint import CheckpointManager
from simmim.engine import Progress, train
from simmim.errors import DataError, NonFiniteLossError
from simmim.metrics_log import read_metrics
from simmim.model import SimMIM
from tests.conftest import tiny_config


def _losses(cfg, **kwargs) -> tuple[list[float], object]:
    seen: list[Progress] = []
    result = train(cfg, on_progress=seen.append, **kwargs)
    return [p.loss for p in seen], result


def test_loss_falls_on_real_images(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"max_steps": 40, "warmup_steps": 4})
    losses, result = _losses(cfg)
    assert len(losses) == 40 and result.steps == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_progress_reports_are_complete(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run", optim={"max_steps": 6})
    seen: list[Progress] = []
    train(cfg, on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6]
    last = seen[-1]
    assert last.total_steps == 6 and last.eta_seconds == 0.0
    assert last.images_per_sec > 0 and 0.0 <= last.data_wait_fraction <= 1.0
    assert seen[0].lr < seen[2].lr  # warmup over 2 steps, then cosine down
    assert seen[2].lr > seen[-1].lr
    points = read_metrics(tmp_path / "run" / "metrics.jsonl", "loss")
    assert [p["step"] for p in points] == [1, 2, 3, 4, 5, 6]
    assert set(points[0]) == {"key", "value", "step", "timestamp"}


def test_reports_come_by_time_when_log_every_is_long(digits: dict[str, Path], tmp_path: Path) -> None:
    """``run.log_interval_s``: the loss is read at most about that often, and always at the end."""
    def slow_steps() -> bool:  # polled once a step: each step takes at least 0.3 s
        time.sleep(0.3)
        return False

    seen: list[Progress] = []
    cfg = tiny_config(digits["train"], tmp_path / "timed", optim={"max_steps": 12},
                      run={"log_every": 1000, "log_interval_s": 1.0, "checkpoint_every": 1000})
    train(cfg, on_progress=seen.append, should_stop=slow_steps)
    steps = [p.step for p in seen]
    # >= 3.6 s of steps: at least 3 interval reports plus the end; and while a step takes under
    # 0.5 s (a tiny model's own step is tens of ms) at most one report every 2 steps
    assert steps[-1] == 12 and 3 <= len(steps) <= 8, steps
    points = read_metrics(tmp_path / "timed" / "metrics.jsonl", "loss")
    assert [p["step"] for p in points] == steps

    quiet: list[Progress] = []
    cfg = tiny_config(digits["train"], tmp_path / "quiet", optim={"max_steps": 12},
                      run={"log_every": 1000, "log_interval_s": 3600.0, "checkpoint_every": 1000})
    train(cfg, on_progress=quiet.append)
    assert [p.step for p in quiet] == [12]  # the end is always reported


def test_interrupted_and_resumed_run_matches_uninterrupted(digits: dict[str, Path], tmp_path: Path) -> None:
    data = {"num_workers": 2}
    full, _ = _losses(tiny_config(digits["train"], tmp_path / "a", data=data))
    cfg_b = tiny_config(digits["train"], tmp_path / "b", data=data)
    calls = {"n": 0}

    def stop_after_seven() -> bool:
        calls["n"] += 1
        return calls["n"] == 7

    first, stopped = _losses(cfg_b, should_stop=stop_after_seven)
    assert stopped.stopped and stopped.steps == 7 and stopped.encoder_dir is None
    second, resumed = _losses(cfg_b)
    assert resumed.resumed_from == 7 and resumed.steps == 12
    assert first + second == full  # bit-exact: weights, optimiser, RNG and data order restored
    points = read_metrics(tmp_path / "b" / "metrics.jsonl", "loss")
    assert [p["step"] for p in points] == list(range(1, 13))


def test_checkpoints_keep_last_plus_final_and_export(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(digits["train"], tmp_path / "run")
    result = train(cfg)
    infos = CheckpointManager(tmp_path / "run" / "checkpoints").list()
    assert [i.step for i in infos] == [4, 8, 12]  # keep_last=2 periodic + the final
    assert infos[-1].final and result.checkpoint is not None and result.checkpoint.step == 12
    config = json.loads((result.encoder_dir / "config.json").read_text())
    assert config["timm_name"] == "vit_tiny_patch16_224" and config["pooling"] == "mean"


def test_gradient_accumulation_matches_large_batch(digits: dict[str, Path], tmp_path: Path) -> None:
    big, _ = _losses(tiny_config(digits["train"], tmp_path / "big", optim={"batch_size": 16, "max_steps": 4}))
    acc, _ = _losses(tiny_config(digits["train"], tmp_path / "acc",
                                 optim={"batch_size": 8, "accumulation_steps": 2, "max_steps": 4}))
    # Same 16 images per step in a different grouping: same loss up to float error.
    assert torch.allclose(torch.tensor(big), torch.tensor(acc), atol=1e-4), (big, acc)


def test_non_finite_loss_stops_with_clear_error(digits: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = SimMIM.forward
    calls = {"n": 0}

    def poisoned(self, images, mask):
        calls["n"] += 1
        loss, rec = original(self, images, mask)
        return (loss * float("nan") if calls["n"] == 3 else loss), rec

    monkeypatch.setattr(SimMIM, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(tiny_config(digits["train"], tmp_path / "run"))


def test_too_few_images_for_one_step(digits: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lower optim\.batch_size"):
        train(tiny_config(digits["train"], tmp_path / "run", optim={"batch_size": 4096}))


def test_compiled_model_gives_the_eager_losses(digits: dict[str, Path], tmp_path: Path) -> None:
    eager, _ = _losses(tiny_config(digits["train"], tmp_path / "eager", optim={"max_steps": 3}))
    compiled, _ = _losses(tiny_config(digits["train"], tmp_path / "compiled", optim={"max_steps": 3},
                                      run={"compile": True}))
    assert torch.allclose(torch.tensor(eager), torch.tensor(compiled), atol=1e-4), (eager, compiled)
