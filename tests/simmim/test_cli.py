"""The ``simmim`` CLI as a user runs it: real subprocesses, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from simmim.metrics_log import read_metrics
from tests.conftest import tiny_config

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def simmim(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "simmim.cli", "-q", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_train_embed_eval_export_round_trip(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tiny_config(digits["train"], tmp_path / "run"))
    out = json.loads(simmim("train", str(cfg), "--set", "optim.max_steps=6").stdout)
    assert out["steps"] == 6 and out["encoder_dir"] and out["stopped_early"] is False
    emb = json.loads(simmim("embed", str(tmp_path / "run"), str(digits["test"]), "--out",
                            str(tmp_path / "emb")).stdout)
    assert emb["shape"] == [80, 48] and emb["failed"] == []
    assert np.load(emb["embeddings"]).shape == (80, 48)
    scores = json.loads(simmim("eval", out["encoder_dir"], "--train", str(digits["train"]),
                               "--test", str(digits["test"])).stdout)
    assert 0.0 <= scores["knn_accuracy"] <= 1.0 and scores["num_classes"] == 10
    exported = json.loads(simmim("export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")).stdout)
    assert exported["step"] == 6
    assert (tmp_path / "exp" / "encoder.safetensors").read_bytes() == \
        (tmp_path / "run" / "encoder" / "encoder.safetensors").read_bytes()


def test_invalid_config_lists_every_problem_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"source": "x"},
        "model": {"image_size": 200, "mask_ratio": 1.5, "colour": "red"},
        "optim": {"batch_size": 0},
    }))
    proc = simmim("train", str(cfg), "--set", "run.precision=fp8", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for fragment in ("model.mask_ratio", "model.colour", "optim.batch_size", "run.precision"):
        assert fragment in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_geometry_and_data_errors_are_one_line(digits: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_config(tmp_path / "cfg.yaml", tiny_config(digits["train"], tmp_path / "run"))
    proc = simmim("train", str(cfg), "--set", "model.image_size=36", check=False)
    assert proc.returncode == 2 and "image_size (36)" in proc.stderr and "Traceback" not in proc.stderr
    proc = simmim("train", str(cfg), "--set", f"data.source={tmp_path / 'missing'}", check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = simmim("train", str(tmp_path / "nope.yaml"), check=False)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_validate_data_reports_bad_files(digits: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in sorted(digits["test"].rglob("*.png"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = json.loads(simmim("validate-data", str(folder), "--json").stdout)
    assert report["total"] == 5 and report["ok"] == 4
    assert [u[0] for u in report["unreadable"]] == ["broken.png"]


def test_two_process_ddp_matches_one_process_with_double_batch(digits: dict[str, Path], tmp_path: Path) -> None:
    single = tiny_config(digits["train"], tmp_path / "one", optim={"batch_size": 16, "max_steps": 4})
    simmim("train", str(_write_config(tmp_path / "one.yaml", single)))
    ddp = tiny_config(digits["train"], tmp_path / "two", optim={"batch_size": 8, "max_steps": 4})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "simmim.cli", "-q", "train", str(_write_config(tmp_path / "two.yaml", ddp))],
        capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [p["value"] for p in read_metrics(tmp_path / "one" / "metrics.jsonl", "loss")]
    two = [p["value"] for p in read_metrics(tmp_path / "two" / "metrics.jsonl", "loss")]
    # Rank r takes every other image of the same permutation: together the same 16 images.
    assert len(one) == len(two) == 4
    assert np.allclose(one, two, atol=1e-4), (one, two)
    assert (tmp_path / "two" / "encoder" / "encoder.safetensors").exists()
