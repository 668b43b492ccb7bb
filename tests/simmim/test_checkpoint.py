"""Tests for simmim.checkpoint: manifests, pruning, corruption handling, crashes, RNG."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from simmim.atomic import atomic_write_bytes
from simmim.checkpoint import CheckpointInfo, CheckpointManager, rng_state, set_rng_state
from simmim.errors import CheckpointError, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _state(step: int) -> dict[str, object]:
    return {"step": step, "weights": torch.full((4, 4), float(step)), "meta": {"lr": 0.1}}


def _save_steps(manager: CheckpointManager, steps: list[int]) -> list[CheckpointInfo]:
    return [manager.save(_state(step), step) for step in steps]


def test_save_list_latest_and_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpts")
    saved = _save_steps(manager, [1, 2, 3])

    assert manager.list() == saved
    assert [i.id for i in saved] == ["ckpt_00000001", "ckpt_00000002", "ckpt_00000003"]
    latest = manager.latest_valid()
    assert latest == saved[-1]
    state = manager.load(latest)
    assert state["step"] == 3 and state["meta"] == {"lr": 0.1}
    assert torch.equal(state["weights"], torch.full((4, 4), 3.0))


def test_manifest_describes_the_file(tmp_path: Path) -> None:
    info = CheckpointManager(tmp_path).save(_state(7), 7, final=True)

    manifest = json.loads((tmp_path / "ckpt_00000007.json").read_text())
    assert manifest == {
        "step": 7,
        "file": "ckpt_00000007.pt",
        "sha256": info.sha256,
        "size": info.path.stat().st_size,
        "final": True,
        "created_at": info.created_at,
        "format_version": 1,
    }
    assert datetime.fromisoformat(info.created_at).utcoffset() == timedelta(0)
    assert info.path == tmp_path / "ckpt_00000007.pt"


def test_prune_keeps_last_k_plus_every_final(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 7):
        manager.save(_state(step), step, final=step in (2, 3))

    assert [(i.step, i.final) for i in manager.list()] == [
        (2, True),
        (3, True),
        (5, False),
        (6, False),
    ]
    expected = {f"ckpt_{s:08d}.{ext}" for s in (2, 3, 5, 6) for ext in ("pt", "json")}
    assert set(os.listdir(tmp_path)) == expected


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(_state(5), 5)
    manager.save({"step": 50}, 5, final=True)

    [info] = manager.list()
    assert info.final
    assert manager.load(info) == {"step": 50}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_truncate, "size"), (_flip_bit, "sha256 mismatch"), (Path.unlink, "missing")],
)
def test_damaged_newest_checkpoint_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], object], reason: str
) -> None:
    manager = CheckpointManager(tmp_path)
    first, second = _save_steps(manager, [1, 2])
    damage(second.path)

    with caplog.at_level(logging.WARNING, logger="simmim.checkpoint"):
        assert manager.latest_valid() == first
    assert "ckpt_00000002" in caplog.text and reason in caplog.text
    with pytest.raises(CheckpointError, match=f"ckpt_00000002.*{reason}"):
        manager.load(second)
    with pytest.raises(CheckpointError, match=reason):
        manager.verify(second)
    assert manager.list() == [first, second], "a corrupt checkpoint must not be deleted"
    assert manager.load(first)["step"] == 1


def test_reading_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "not" / "there")
    assert manager.list() == []
    assert manager.latest_valid() is None
    assert os.listdir(tmp_path) == []
    manager.save(_state(1), 1)
    assert [i.step for i in manager.list()] == [1]


def test_no_valid_checkpoint_returns_none(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.latest_valid() is None
    [only] = _save_steps(manager, [1])
    _flip_bit(only.path)
    assert manager.latest_valid() is None


def test_pt_without_manifest_is_ignored_then_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    _save_steps(manager, [1])
    # A crash between the .pt rename and the manifest write leaves exactly this.
    orphan = tmp_path / "ckpt_00000002.pt"
    atomic_write_bytes(orphan, (tmp_path / "ckpt_00000001.pt").read_bytes())

    assert [i.step for i in manager.list()] == [1]
    latest = manager.latest_valid()
    assert latest is not None and latest.step == 1

    manager.save(_state(3), 3)
    assert not orphan.exists()


def test_unreadable_or_future_manifest_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path)
    _save_steps(manager, [1])
    (tmp_path / "ckpt_00000008.json").write_text("{not json")
    future = json.loads((tmp_path / "ckpt_00000001.json").read_text()) | {"format_version": 99}
    (tmp_path / "ckpt_00000009.json").write_text(json.dumps(future))

    with caplog.at_level(logging.WARNING, logger="simmim.checkpoint"):
        assert [i.step for i in manager.list()] == [1]
    assert "ckpt_00000008.json" in caplog.text and "format_version" in caplog.text


def test_stale_checkpoint_temp_files_are_removed_on_save(tmp_path: Path) -> None:
    stale = tmp_path / ".tmp-ckpt_00000001.pt-deadbeef"
    unrelated = tmp_path / ".tmp-metrics.json-cafe"
    for path in (stale, unrelated):
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - 600, time.time() - 600))

    CheckpointManager(tmp_path).save(_state(1), 1)

    assert not stale.exists()
    assert unrelated.exists(), "only checkpoint temp files are ours to delete"


def test_state_that_weights_only_load_would_refuse_is_rejected(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\['np'\] is a numpy.ndarray"):
        manager.save({"rng": {"np": np.zeros(3)}}, 1)
    with pytest.raises(CheckpointError, match=r"numpy.float64"):
        manager.save({"loss": [np.float64(1.0)]}, 1)
    with pytest.raises(CheckpointError, match="step must be an integer >= 0"):
        manager.save({}, -1)
    assert os.listdir(tmp_path) == []


def test_invalid_keep_last_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _draw() -> tuple[float, float, list[float], list[float]]:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist())


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    manager = CheckpointManager(tmp_path)
    info = manager.save({"rng": rng_state()}, 1)
    expected = _draw()
    _draw()

    set_rng_state(manager.load(info)["rng"])

    assert _draw() == expected


def test_set_rng_state_rejects_malformed_state() -> None:
    with pytest.raises(CheckpointError, match="rng_state"):
        set_rng_state({"python": {}})


def test_cuda_rng_restored_for_available_devices(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda _state, device: restored.append(device))
    two_devices = [torch.zeros(8, dtype=torch.uint8)] * 2
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: two_devices)

    with caplog.at_level(logging.WARNING, logger="simmim.checkpoint"):
        set_rng_state(rng_state())

    assert restored == [0]
    assert "2 device(s), 1 available" in caplog.text


_CRASHING_WRITER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import torch
    from simmim.checkpoint import CheckpointManager
    from simmim.errors import CheckpointError

    torch.set_num_threads(1)  # no thread pool in the parent, so fork() is safe
    directory, delays = sys.argv[1], [float(d) for d in sys.argv[2].split(",")]
    manager = CheckpointManager(directory, keep_last=2)
    for delay in delays:
        pid = os.fork()
        if pid == 0:  # writer: resume after the newest valid checkpoint, save forever
            try:
                latest = manager.latest_valid()
                step = latest.step + 1 if latest else 1
                while True:
                    payload = torch.full((1_000_000,), float(step))
                    manager.save({"step": step, "payload": payload}, step)
                    step += 1
            finally:
                os._exit(1)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # Inspect right after each kill: the next writer would overwrite the damage.
        problems, infos = [], manager.list()
        for info in infos:
            try:
                manager.verify(info)
            except CheckpointError as exc:
                problems.append(str(exc))
        temps = [n for n in os.listdir(directory) if n.startswith(".tmp-")]
        print(json.dumps({"steps": [i.step for i in infos], "problems": problems, "temps": temps}))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")
def test_sigkilled_writer_never_leaves_a_visible_broken_checkpoint(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    delays = [rng.uniform(0.05, 0.3) for _ in range(8)]  # ~1.4 s of writing in total
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(tmp_path), ",".join(map(str, delays))],
        env=os.environ | {"PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"seed={seed}\n{result.stderr}"
    rounds = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rounds) == len(delays), f"seed={seed}\n{result.stdout}"
    assert [r["problems"] for r in rounds] == [[]] * len(delays), f"seed={seed}"

    manager = CheckpointManager(tmp_path, keep_last=2)
    infos = manager.list()
    assert infos, f"seed={seed}: the writer never completed a checkpoint"
    latest = manager.latest_valid()
    assert latest == infos[-1], f"seed={seed}"
    state = manager.load(latest)
    assert state["step"] == latest.step
    assert torch.equal(state["payload"], torch.full((1_000_000,), float(latest.step)))

    manager.save(state, latest.step + 1)  # the next save clears killed writers' leftovers
    names = os.listdir(tmp_path)
    assert not [n for n in names if n.startswith(".tmp-")], f"seed={seed}"
    assert len([n for n in names if n.endswith(".pt")]) == len(manager.list()) == len(names) // 2
