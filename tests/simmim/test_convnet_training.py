"""ConvNets through the product: training on real images, export to plain timm, embeddings, spec checks."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from simmim.embed import Embedder
from simmim.engine import train
from simmim.errors import ConfigError
from simmim_service import model_catalog
from simmim_service.spec import TrainingSpec, check_training
from tests.conftest import tiny_config

MODELS = {  # resnet with re-masking (norm classes switched in training), convnext with the default (off)
    "resnet": {"name": "resnet18", "image_size": 64, "patch_size": None, "mask_patch_size": 32,
               "model_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}, "convnet_remask": True},
    "convnext": {"name": "convnext_atto", "image_size": 64, "patch_size": None, "mask_patch_size": 32,
                 "model_kwargs": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}},
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def trained(request: pytest.FixtureRequest, digits: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list[float]]:
    run = tmp_path_factory.mktemp(request.param)
    losses: list[float] = []
    train(tiny_config(digits["train"], run, model=MODELS[request.param],
                      optim={"max_steps": 24, "warmup_steps": 2, "base_lr": 0.2}),
          on_progress=lambda p: losses.append(p.loss))
    return request.param, run, losses


def _images(emb: Embedder, folder: Path, n: int) -> torch.Tensor:
    from PIL import Image

    return torch.stack([emb.transform(Image.open(p).convert("RGB")) for p in sorted(folder.rglob("*.png"))[:n]])


def test_loss_falls_on_real_images(trained: tuple[str, Path, list[float]]) -> None:
    family, _, losses = trained
    assert len(losses) == 24
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # Seeded CPU runs: measured 1.47 -> 1.33 (resnet, 3 of 4 blocks masked at 64 px) and 1.48 -> 0.95 (convnext).
    assert last < {"resnet": 0.95, "convnext": 0.8}[family] * first, losses


def test_export_loads_in_plain_timm_with_identical_embeddings(trained: tuple[str, Path, list[float]],
                                                              digits: dict[str, Path]) -> None:
    _, run, _ = trained
    cfg = json.loads((run / "encoder" / "config.json").read_text())
    assert "img_size" not in cfg["timm_kwargs"] and cfg["timm_kwargs"]["num_classes"] == 0
    plain = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["timm_kwargs"]).eval()
    plain.load_state_dict(load_file(str(run / "encoder" / "encoder.safetensors")))
    ours = Embedder.load(run / "encoder")
    images = _images(ours, digits["test"], 4)
    with torch.no_grad():
        expected = plain(images)
        pooled = plain.forward_features(images).mean(dim=(2, 3))  # global average of the final map
    assert torch.allclose(ours.embed_tensors(images), expected, atol=1e-5)
    assert torch.allclose(expected, pooled, atol=1e-5)
    assert expected.shape == (4, 128)
    from_ckpt = Embedder.load(sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1])  # our model, switched norms
    assert torch.allclose(from_ckpt.embed_tensors(images), expected, atol=1e-5)


def test_embedding_of_any_stage(trained: tuple[str, Path, list[float]], digits: dict[str, Path]) -> None:
    _, run, _ = trained
    emb = Embedder.load(run)
    images = _images(emb, digits["test"], 2)
    assert emb.num_layers == 4
    dims = [emb.embed_tensors(images, layer=i).shape[1] for i in range(4)]
    assert dims == [16, 32, 64, 128]
    assert torch.equal(emb.embed_tensors(images, layer=-1), emb.embed_tensors(images, layer=3))
    with pytest.raises(ConfigError, match="out of range"):
        emb.embed_tensors(images, layer=4)
    with pytest.raises(ConfigError, match="no class token"):
        emb.embed_tensors(images, pooling="cls")


@pytest.mark.parametrize("name", ["resnet50", "resnetv2_50", "convnext_tiny"])
def test_catalog_lists_convnets_with_their_strides(name: str) -> None:
    entry = model_catalog.lookup(name)
    assert entry is not None and entry["family"] in model_catalog.CONVNET_FAMILIES
    assert (entry["patch_size"], entry["stride"]) == (4, 32)


def test_spec_checks_for_convnets() -> None:
    assert check_training(TrainingSpec(model="resnet50", image_size=224)) == []
    assert check_training(TrainingSpec(model="convnext_tiny", image_size=192, mask_patch_size=64)) == []
    problems = check_training(TrainingSpec(model="resnet50", image_size=224, patch_size=16))
    assert [p["field"] for p in problems] == ["training.patch_size"] and "no patch size" in problems[0]["message"]
    problems = check_training(TrainingSpec(model="convnext_tiny", image_size=200, mask_patch_size=16))
    assert {p["field"] for p in problems} == {"training.image_size", "training.mask_patch_size"}
    assert any("total stride (32)" in p["message"] for p in problems)
