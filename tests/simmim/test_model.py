import numpy as np
import pytest
import torch

from simmim.backbones import timm_kwargs
from simmim.config import ModelConfig
from simmim.errors import ConfigError
from simmim.model import build_mask_generator, build_model

TINY = {
    "vit": dict(name="vit_tiny_patch16_224", image_size=32, patch_size=4, mask_patch_size=8,
                model_kwargs={"depth": 2}),
    "deit": dict(name="deit_tiny_patch16_224", image_size=32, patch_size=8, mask_patch_size=16,
                 model_kwargs={"depth": 2}),
    "eva": dict(name="eva02_tiny_patch14_224", image_size=28, mask_patch_size=14, model_kwargs={"depth": 2}),
    "swin": dict(name="swin_tiny_patch4_window7_224", image_size=64, mask_patch_size=32,
                 model_kwargs={"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 2, 2)}),
    "swinv2": dict(name="swinv2_tiny_window8_256", image_size=64, mask_patch_size=32,
                   model_kwargs={"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 2, 2)}),
}


def _batch(cfg: ModelConfig, model, n: int = 2, seed: int = 0):
    gen = build_mask_generator(cfg, model.encoder)
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(n)]))
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    return images, mask


@pytest.mark.parametrize("family", sorted(TINY))
def test_shapes_finite_loss_and_gradients(family: str) -> None:
    cfg = ModelConfig(**TINY[family])
    model = build_model(cfg)
    images, mask = _batch(cfg, model)
    loss, rec = model(images, mask)
    assert rec.shape == images.shape
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    conv = model.decoder[0]
    assert conv.out_channels == model.encoder.stride**2 * 3
    assert conv.in_channels == model.encoder.num_features


def test_decoder_stride_is_encoder_total_stride() -> None:
    vit = build_model(ModelConfig(name="vit_tiny_patch16_224", image_size=64, model_kwargs={"depth": 1}))
    assert vit.encoder.stride == 16 and vit.decoder[1].upscale_factor == 16
    swin = build_model(ModelConfig(**TINY["swin"]))
    assert swin.encoder.stride == 32 and swin.encoder.patch_size == 4


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mask_token_replaces_patch_embeddings(family: str) -> None:
    cfg = ModelConfig(**TINY[family])
    model = build_model(cfg).eval()
    images, mask = _batch(cfg, model, n=1)
    seen = {}
    original_encode = model.encoder.encode

    def spy(tokens: torch.Tensor) -> torch.Tensor:
        seen["tokens"] = tokens
        return original_encode(tokens)

    model.encoder.encode = spy
    model(images, mask)
    tokens = seen["tokens"].reshape(-1, model.encoder.embed_dim)  # (L, D)
    flat = mask.flatten().bool()
    embedded = model.encoder.embed(images).reshape(-1, model.encoder.embed_dim)
    assert torch.allclose(tokens[flat], model.mask_token.reshape(1, -1).expand(int(flat.sum()), -1))
    assert torch.allclose(tokens[~flat], embedded[~flat])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_masked_pixels_do_not_reach_the_encoder(family: str) -> None:
    # Pixels are not zeroed; their patch embeddings are replaced, so changing them changes nothing.
    cfg = ModelConfig(**TINY[family])
    model = build_model(cfg).eval()
    images, mask = _batch(cfg, model, n=1)
    p = model.encoder.patch_size
    pixel_mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).bool()
    noisy = torch.where(pixel_mask, torch.randn_like(images) * 10, images)
    with torch.no_grad():
        a = model.encoder.encode(model.mask_tokens(model.encoder.embed(images), mask))
        b = model.encoder.encode(model.mask_tokens(model.encoder.embed(noisy), mask))
    assert torch.allclose(a, b, atol=1e-5)


def test_param_groups_exclude_tokens_norms_biases_positions() -> None:
    model = build_model(ModelConfig(**TINY["vit"], pos_embed="learned"))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in ("mask_token", "encoder.model.pos_embed", "encoder.model.cls_token",
                 "encoder.model.blocks.0.norm1.weight", "encoder.model.blocks.0.attn.qkv.bias"):
        assert id(named[name]) in ids, name
    assert id(named["encoder.model.blocks.0.attn.qkv.weight"]) in {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_sincos_position_table_is_frozen_and_excluded() -> None:
    model = build_model(ModelConfig(**TINY["vit"]))
    pos = model.encoder.model.pos_embed
    assert not pos.requires_grad
    assert torch.all(pos[0, 0] == 0)  # class-token slot
    assert pos[0, 1:].abs().max() <= 1.0 and pos[0, 1:].std() > 0.3
    all_params = {id(p) for g in model.param_groups(0.05) for p in g["params"]}
    assert id(pos) not in all_params


@pytest.mark.parametrize(("size", "window"), [(192, 6), (224, 7), (64, 2)])
def test_swin_window_follows_resolution(size: int, window: int) -> None:
    assert timm_kwargs("swin_base_patch4_window7_224", size)["window_size"] == window


def test_unknown_and_unsupported_models_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        build_model(ModelConfig(name="vit_tiny_patch16_2244", image_size=64))
    with pytest.raises(ConfigError, match="not supported"):
        build_model(ModelConfig(name="efficientnet_b0", image_size=64))
    with pytest.raises(ConfigError, match="mask_patch_size"):
        build_model(ModelConfig(name="vit_tiny_patch16_224", image_size=96, mask_patch_size=24))
