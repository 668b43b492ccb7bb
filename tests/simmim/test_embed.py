import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from simmim.data import FolderSource
from simmim.embed import Embedder, save_embeddings
from simmim.engine import train
from simmim.errors import ConfigError
from simmim.evaluate import evaluate_folders, knn_accuracy, linear_probe_accuracy
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(digits["train"], run, optim={"max_steps": 8}))
    return run


def test_export_loads_in_plain_timm_with_identical_embeddings(trained: Path, digits: dict[str, Path]) -> None:
    cfg = json.loads((trained / "encoder" / "config.json").read_text())
    plain = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["timm_kwargs"]).eval()
    plain.load_state_dict(load_file(str(trained / "encoder" / "encoder.safetensors")))
    ours = Embedder.load(trained / "encoder")
    images = torch.stack([ours.transform(img) for img in _pil_images(digits["test"], 4)])
    with torch.no_grad():
        expected = plain(images)
        tokens = plain.forward_features(images)[:, plain.num_prefix_tokens:].mean(1)
    assert torch.allclose(ours.embed_tensors(images), expected, atol=1e-5)
    assert torch.allclose(expected, tokens, atol=1e-5)  # plain model(x) is the mean of patch tokens


def test_checkpoint_and_export_give_the_same_embeddings(trained: Path, digits: dict[str, Path]) -> None:
    from_export = Embedder.load(trained / "encoder")
    final = sorted((trained / "checkpoints").glob("ckpt_*.pt"))[-1]
    from_ckpt = Embedder.load(final)
    images = torch.stack([from_export.transform(img) for img in _pil_images(digits["test"], 3)])
    assert torch.allclose(from_export.embed_tensors(images), from_ckpt.embed_tensors(images), atol=1e-6)


def test_pooling_options(trained: Path, digits: dict[str, Path]) -> None:
    emb = Embedder.load(trained)
    images = torch.stack([emb.transform(img) for img in _pil_images(digits["test"], 2)])
    mean = emb.embed_tensors(images)
    cls = emb.embed_tensors(images, pooling="cls")
    layer0 = emb.embed_tensors(images, layer=0)
    last = emb.embed_tensors(images, layer=-1)
    assert mean.shape == cls.shape == layer0.shape == (2, 48)
    assert not torch.allclose(mean, cls) and not torch.allclose(layer0, last)
    unit = emb.embed_tensors(images, normalize=True)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2), atol=1e-5)
    with pytest.raises(ConfigError, match="out of range"):
        emb.embed_tensors(images, layer=5)


def test_embed_source_keeps_order_and_reports_failures(trained: Path, tmp_path: Path,
                                                        digits: dict[str, Path]) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, path in enumerate(sorted(digits["test"].rglob("*.png"))[:5]):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "5.png").write_bytes(b"not an image")
    emb = Embedder.load(trained)
    result = emb.embed_source(FolderSource(folder), batch_size=4)
    assert result.names == [f"{i}.png" for i in range(6)]
    assert result.failed == ["5.png"]
    assert result.embeddings.shape == (6, 48) and not result.embeddings[5].any()
    npy, files = save_embeddings(result, tmp_path / "out")
    assert np.array_equal(np.load(npy), result.embeddings)
    assert files.read_text().splitlines() == result.names


def test_knn_and_linear_probe_on_separable_and_random_features() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    centers = rng.normal(size=(3, 8)) * 5
    x = centers[y] + rng.normal(size=(120, 8))
    tr, te = np.arange(120) % 4 != 0, np.arange(120) % 4 == 0
    assert knn_accuracy(x[tr], y[tr], x[te], y[te]) == 1.0
    assert linear_probe_accuracy(x[tr], y[tr], x[te], y[te]) == 1.0
    noise = rng.normal(size=(120, 8))
    assert knn_accuracy(noise[tr], y[tr], noise[te], y[te]) < 0.7


def test_evaluate_folders_on_digits(trained: Path, digits: dict[str, Path]) -> None:
    report = evaluate_folders(Embedder.load(trained), digits["train"], digits["test"])
    assert report.num_classes == 10 and report.num_test == 80
    assert report.knn_accuracy > 0.3 and report.linear_probe_accuracy > 0.3  # chance is 0.1


def _pil_images(folder: Path, n: int):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(folder.rglob("*.png"))[:n]]


def test_swin_trains_exports_and_matches_plain_timm(digits: dict[str, Path], tmp_path: Path) -> None:
    model = {"name": "swin_tiny_patch4_window7_224", "image_size": 64, "patch_size": None,
             "mask_patch_size": 32,
             "model_kwargs": {"depths": [1, 1, 1, 1], "embed_dim": 24, "num_heads": [1, 1, 2, 2]}}
    result = train(tiny_config(digits["train"], tmp_path / "swin", model=model, optim={"max_steps": 3}))
    cfg = json.loads((result.encoder_dir / "config.json").read_text())
    assert cfg["timm_kwargs"]["window_size"] == 2  # 64 px / 32
    plain = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["timm_kwargs"]).eval()
    plain.load_state_dict(load_file(str(result.encoder_dir / "encoder.safetensors")))
    ours = Embedder.load(result.encoder_dir)
    images = torch.stack([ours.transform(img) for img in _pil_images(digits["test"], 2)])
    with torch.no_grad():
        assert torch.allclose(ours.embed_tensors(images), plain(images), atol=1e-5)
    assert ours.embed_tensors(images, layer=1).shape == (2, 48)
    with pytest.raises(ConfigError, match="no class token"):
        ours.embed_tensors(images, pooling="cls")


def test_init_checkpoint_loads_exported_weights(trained: Path) -> None:
    from simmim.config import ModelConfig
    from simmim.model import build_model

    cfg = json.loads((trained / "config.json").read_text())["model"]
    fresh = build_model(ModelConfig(**cfg))
    init = build_model(ModelConfig(**{**cfg, "init_checkpoint": str(trained / "encoder" / "encoder.safetensors")}))
    exported = load_file(str(trained / "encoder" / "encoder.safetensors"))
    for name, value in init.encoder.model.state_dict().items():
        assert torch.equal(value, exported[name]), name
    assert not torch.equal(fresh.encoder.model.blocks[0].attn.qkv.weight, init.encoder.model.blocks[0].attn.qkv.weight)
