"""FastFill's losses on hand-computed values (DESIGN.md, "The method, precisely")."""
import math

import pytest
import torch

from fastfill_udfs.losses import alignment_loss, fastfill_loss, fct_loss, l2_per_item


def test_l2_and_fct_loss_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # ||(1, 2)||^2 = 5, ||(-3, -4)||^2 = 25
    assert l2_per_item(pred, target).tolist() == pytest.approx([5.0, 25.0])
    assert fct_loss(pred, target).item() == pytest.approx(15.0)
    assert fct_loss(target, target).item() == 0.0


def test_l2_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        fct_loss(torch.zeros(2, 3), torch.zeros(2, 2))


def test_alignment_loss_hand_computed_without_smoothing():
    pred = torch.tensor([[1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0]])              # L2 = 1
    logits = torch.tensor([[math.log(3.0), 0.0]])    # softmax = (3/4, 1/4)
    got = alignment_loss(pred, target, logits, torch.tensor([0]), label_smoothing=0.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(1.0 + math.log(4.0 / 3.0), abs=1e-6)
    got1 = alignment_loss(pred, target, logits, torch.tensor([1]), label_smoothing=0.0)
    assert got1.item() == pytest.approx(1.0 + math.log(4.0), abs=1e-6)


def test_label_smoothing_matches_manual_formula():
    # CE_ls = (1 - eps) * -log p_y + eps * mean_k(-log p_k), K = 2 classes, eps = 0.1
    eps = 0.1
    logits = torch.tensor([[math.log(3.0), 0.0]])    # p = (3/4, 1/4)
    nll = [math.log(4.0 / 3.0), math.log(4.0)]
    expected = (1 - eps) * nll[0] + eps * (nll[0] + nll[1]) / 2
    pred = target = torch.zeros(1, 2)                # L2 term = 0
    got = alignment_loss(pred, target, logits, torch.tensor([0]), label_smoothing=eps)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # three classes, uniform logits: CE is log 3 whatever the smoothing
    got3 = alignment_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3),
                          torch.tensor([2]), label_smoothing=eps)
    assert got3.item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_alignment_loss_is_per_item():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    logits = torch.zeros(2, 2)                       # CE = log 2 for both
    got = alignment_loss(pred, target, logits, torch.tensor([0, 1]), label_smoothing=0.1)
    assert got.tolist() == pytest.approx([5 + math.log(2), 25 + math.log(2)], abs=1e-6)


def test_fastfill_loss_hand_computed():
    per_item = torch.tensor([2.0, 4.0])
    s = torch.tensor([0.0, math.log(2.0)])
    # item 1: 0.5 * 1 * 2 + 0 = 1; item 2: 0.5 * (1/2) * 4 + 0.5 log 2 = 1 + 0.5 log 2
    expected = (1.0 + 1.0 + 0.5 * math.log(2.0)) / 2
    assert fastfill_loss(per_item, s).item() == pytest.approx(expected, abs=1e-6)


def test_fastfill_loss_gradient_in_s_is_zero_at_log_L():
    per_item = torch.tensor([0.3, 1.0, 2.5, 7.0])
    s = torch.log(per_item).clone().requires_grad_(True)
    fastfill_loss(per_item, s).backward()
    assert s.grad.abs().max().item() < 1e-6
    # and the loss at s = log L is a minimum in s: nudging s either way increases it
    with torch.no_grad():
        at_opt = fastfill_loss(per_item, s)
        for delta in (-0.1, 0.1):
            assert fastfill_loss(per_item, s + delta) > at_opt


def test_fastfill_loss_gradient_sign_pushes_s_toward_log_L():
    per_item = torch.tensor([4.0])
    s = torch.zeros(1, requires_grad=True)           # s below log 4: loss falls as s rises
    fastfill_loss(per_item, s).backward()
    assert s.grad.item() == pytest.approx(-0.5 * 4.0 + 0.5)


def test_fastfill_loss_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        fastfill_loss(torch.zeros(3), torch.zeros(2))
