import torch

from simmim.loss import masked_l1_loss, upsample_mask


def test_loss_equals_paper_formula_on_hand_made_tensors() -> None:
    target = torch.zeros(1, 3, 4, 4)
    pred = torch.zeros(1, 3, 4, 4)
    pred[0, :, :2, :2] = 2.0  # error 2 in the top-left token (masked)
    pred[0, :, 2:, 2:] = 5.0  # error 5 in the bottom-right token (visible: ignored)
    mask = torch.tensor([[[1, 0], [0, 0]]])  # (1, 2, 2) tokens of 2x2 px
    # sum(|e| * m) = 3 channels * 4 px * 2 = 24; sum(m) = 4 px; / C = 3 -> 24 / 4 / 3 = 2
    loss = masked_l1_loss(pred, target, mask, patch_size=2)
    assert torch.allclose(loss, torch.tensor(24 / (4 + 1e-5) / 3))


def test_loss_ignores_visible_pixels_and_matches_manual_mean() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mask = torch.randint(0, 2, (2, 4, 4))
    pix = upsample_mask(mask, 2).expand(-1, 3, -1, -1).bool()
    manual = (pred - target).abs()[pix].mean()
    assert torch.allclose(masked_l1_loss(pred, target, mask, 2), manual, atol=1e-5)
    changed = pred.clone()
    changed[~pix] += 100.0
    assert torch.allclose(masked_l1_loss(changed, target, mask, 2), manual, atol=1e-5)


def test_upsample_mask_shape() -> None:
    mask = torch.tensor([[[1, 0], [0, 1]]])
    up = upsample_mask(mask, 3)
    assert up.shape == (1, 1, 6, 6)
    assert up[0, 0, :3, :3].all() and not up[0, 0, :3, 3:].any()
