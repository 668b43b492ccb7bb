"""ConvNet encoders (ResNet, ResNetV2, ConvNeXt): mask geometry, re-masking, visible-only norms."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from simmim.backbones import ConvNetAdapter
from simmim.config import ModelConfig
from simmim.errors import ConfigError
from simmim.model import build_mask_generator, build_model
from simmim.visible_norm import visible_batch_norm, visible_group_norm

# zero_init_last=False: with timm's zero-initialised last norm of every block and re-masking, the
# mask token gets no gradient until those weights move (masked cells are zeroed after stage 1 and
# the residual branches that would carry the token to visible neighbours start at zero).
TINY = {
    "resnet": dict(name="resnet18", model_kwargs={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128],
                                                  "stem_width": 16, "zero_init_last": False}),
    "resnetv2": dict(name="resnetv2_18", model_kwargs={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128],
                                                       "stem_chs": 16, "zero_init_last": False}),
    "resnetv2_gn": dict(name="resnetv2_50d_gn", model_kwargs={"layers": [1, 1, 1, 1], "zero_init_last": False}),
    "convnext": dict(name="convnext_atto", model_kwargs={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}),
}


def _cfg(family: str, image_size: int = 96, **kw) -> ModelConfig:
    return ModelConfig(**TINY[family], image_size=image_size, mask_patch_size=32, **kw)


def _batch(cfg: ModelConfig, model, n: int = 2, seed: int = 0):
    gen = build_mask_generator(cfg, model.encoder)
    rng = np.random.default_rng(seed)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(n)]))
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    return images, mask


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("remask", [True, False])
def test_shapes_finite_loss_and_gradients(family: str, remask: bool) -> None:
    cfg = _cfg(family, convnet_remask=remask)
    model = build_model(cfg)
    enc = model.encoder
    assert isinstance(enc, ConvNetAdapter) and enc.remask is remask
    assert (enc.patch_size, enc.stride) == (4, 32)
    images, mask = _batch(cfg, model)
    with torch.no_grad():  # at its 0.02 init the token sits below every pre-activation BN mean of
        model.mask_token.normal_()  # ResNetV2's (max-pooled) stem output, so ReLU zeroes its gradient
    assert enc.embed(images).shape == (2, 24, 24, enc.embed_dim)  # stem output, channels last
    loss, rec = model(images, mask)
    assert rec.shape == images.shape and torch.isfinite(loss)
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.decoder[0].in_channels == enc.num_features and model.decoder[1].upscale_factor == 32


def test_masks_align_with_the_total_stride() -> None:
    cfg = _cfg("resnet", image_size=128)
    model = build_model(cfg)
    gen = build_mask_generator(cfg, model.encoder)
    mask = gen(np.random.default_rng(3))
    assert mask.shape == (32, 32)  # stem grid: 128 px / 4
    cells = mask.reshape(4, 8, 4, 8)  # (final cell row, stem row, final cell col, stem col)
    assert (cells == cells[:, :1, :, :1]).all()  # constant inside every 32 px cell of the final map
    assert cells[:, 0, :, 0].sum() == 10  # ceil(0.6 * 16) blocks


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"mask_patch_size": 16}, "mask_patch_size (16) must be a multiple of the ConvNet's total stride (32)"),
    ({"mask_patch_size": 48}, "mask_patch_size (48) must be a multiple"),
    ({"image_size": 80, "mask_patch_size": 32}, "image_size (80) is not divisible by the ConvNet's total stride (32)"),
    ({"patch_size": 8}, "has no patch size"),
    ({"window_size": 7}, "window_size only applies to Swin"),
])
def test_bad_geometry_is_a_config_error(overrides: dict, needle: str) -> None:
    raw = {**TINY["convnext"], "image_size": 96, "mask_patch_size": 32, **overrides}
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(**raw))
    assert needle in str(err.value)


def test_norms_without_a_visible_only_version_are_refused_only_when_remasking() -> None:
    cfg = dict(name="resnetv2_50d_evos", image_size=64, mask_patch_size=32, model_kwargs={"layers": [1, 1, 1, 1]})
    with pytest.raises(ConfigError, match=r"EvoNorm.*convnet_remask=false"):
        build_model(ModelConfig(**cfg, convnet_remask=True))
    assert not build_model(ModelConfig(**cfg, convnet_remask=False)).encoder.remask


def _stage_inputs(model, images, mask) -> list[torch.Tensor]:
    """The input of every stage after the first, and the final feature map."""
    seen: list[torch.Tensor] = []
    stages = model.encoder.stages
    hooks = [s.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for s in stages[1:]]
    with torch.no_grad():
        seen_final = model.encoder.encode_masked(model.mask_tokens(model.encoder.embed(images), mask), mask)
    for h in hooks:
        h.remove()
    return [*seen, seen_final]


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_masked_positions_stay_masked_through_each_stage_when_remasking(family: str) -> None:
    model = build_model(_cfg(family, image_size=128, convnet_remask=True)).train()
    images, mask = _batch(_cfg(family, image_size=128), model, n=3)
    *between, final = _stage_inputs(model, images, mask)
    assert [t.shape[-1] for t in between] == [32, 16, 8]  # outputs of stages 0-2: stride 4, 8, 16
    for feat in between:
        masked = F.interpolate(mask[:, None].float(), size=feat.shape[-2:]).bool().expand_as(feat)  # (B, C, h, w)
        assert feat[masked].abs().max() == 0  # zeroed after the previous stage
        assert feat[~masked].abs().amax() > 0
    cell_masked = mask[:, ::8, ::8].bool()  # (B, 4, 4) final-map cells
    assert final.permute(0, 2, 3, 1)[cell_masked].abs().amax() > 0  # the last stage fills masked cells

    dense = build_model(_cfg(family, image_size=128, convnet_remask=False))
    dense.load_state_dict(model.state_dict())
    *between_dense, _ = _stage_inputs(dense.train(), images, mask)
    masked = F.interpolate(mask[:, None].float(), size=between_dense[0].shape[-2:]).bool()
    assert between_dense[0][masked.expand_as(between_dense[0])].abs().amax() > 0  # without re-masking they are not


def test_visible_batch_norm_uses_visible_statistics_and_updates_running_stats() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(3, 4, 6, 6) * 3 + 1
    visible = (torch.rand(3, 1, 6, 6) > 0.4).float()
    y = visible_batch_norm(bn, x, visible)
    vis = visible[:, 0].bool()  # (B, H, W)
    picked = x.permute(0, 2, 3, 1)[vis]  # (N, C): only visible positions
    reference = F.batch_norm(picked[:, :, None, None], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    assert torch.allclose(y.permute(0, 2, 3, 1)[vis], reference[:, :, 0, 0], atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * picked.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * picked.var(0, unbiased=True), atol=1e-5)
    x2 = torch.where(visible.bool(), x, torch.full_like(x, 1e4))  # garbage at masked positions
    assert torch.allclose(visible_batch_norm(bn, x2, visible) * visible, y * visible, atol=1e-4)


def test_visible_group_norm_matches_group_norm_on_visible_positions() -> None:
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(2, 4)
    x = torch.randn(2, 4, 5, 5)
    visible = (torch.rand(2, 1, 5, 5) > 0.5).float()
    y = visible_group_norm(gn, x, visible)
    for b in range(2):
        vis = visible[b, 0].bool()
        picked = x[b][:, vis]  # (C, N)
        ref = F.group_norm(picked[None, :, :, None], 2, gn.weight, gn.bias, gn.eps)[0, :, :, 0]
        assert torch.allclose(y[b][:, vis], ref, atol=1e-5)


def test_state_dict_keys_are_plain_timm_and_eval_mode_is_plain_timm() -> None:
    cfg = _cfg("resnet")
    model = build_model(cfg)
    plain = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.model_kwargs)
    assert list(model.encoder.model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.encoder.model.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.encoder.model.eval()(x), plain.eval()(x), atol=1e-6)


def test_model_config_stores_remask_only_when_not_the_default() -> None:
    default = ModelConfig(name="resnet50").model_dump(mode="json")
    assert "convnet_remask" not in default  # checkpoints from before the field still resume
    flipped = ModelConfig(name="resnet50", convnet_remask=not ModelConfig().convnet_remask)
    assert ModelConfig.model_validate(flipped.model_dump(mode="json")) == flipped
