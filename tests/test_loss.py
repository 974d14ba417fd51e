from __future__ import annotations

import pytest
import torch

from hipseg_lib.loss import DiceCELoss, soft_dice_per_class


def _perfect_logits(y, c=6, scale=30.0):
    return torch.nn.functional.one_hot(y, c).movedim(-1, 1).float() * scale


def test_perfect_prediction_scores_near_zero_even_with_absent_classes():
    y = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    y[:, 2:5, 2:5, :] = 1  # classes 2..5 absent
    loss = DiceCELoss(6)(_perfect_logits(y), y)
    assert loss.item() < 1e-3


def test_absent_class_not_counted_in_dice_but_false_positives_cost():
    y = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    y[:, 2:5, 2:5, :] = 1
    dice, present = soft_dice_per_class(_perfect_logits(y), y)
    assert present.tolist() == [[True, True, False, False, False, False]], "(samples, classes)"
    wrong = _perfect_logits(y)
    wrong[:, 5, 0, 0, 0] = 100.0  # one false-positive prostate voxel
    assert DiceCELoss(6)(wrong, y) > DiceCELoss(6)(_perfect_logits(y), y)


def test_known_value_dice_only():
    # Two classes, hard predictions: class 1 predicted on 2 voxels, true on 1 of them and on 1 other.
    y = torch.tensor([[[[1, 1, 0, 0]]]])
    logits = _perfect_logits(torch.tensor([[[[1, 0, 1, 0]]]]), c=2, scale=50.0)
    dice, _ = soft_dice_per_class(logits, y)
    torch.testing.assert_close(dice, torch.tensor([[0.5, 0.5]]), atol=1e-4, rtol=0)
    loss = DiceCELoss(2, dice_weight=1.0, ce_weight=0.0)(logits, y)
    assert abs(loss.item() - 0.5) < 1e-4


def test_class_weights_and_validation():
    y = torch.randint(0, 3, (2, 4, 4, 4))
    logits = torch.randn(2, 3, 4, 4, 4)
    a = DiceCELoss(3)(logits, y)
    b = DiceCELoss(3, class_weights=[1.0, 5.0, 5.0])(logits, y)
    assert torch.isfinite(a) and torch.isfinite(b) and a != b
    with pytest.raises(ValueError, match="class_weights needs 3"):
        DiceCELoss(3, class_weights=[1.0])
    with pytest.raises(ValueError, match="do not fit target"):
        DiceCELoss(4)(logits, y)


def test_gradients_flow_in_bf16_autocast():
    logits = torch.randn(1, 6, 4, 4, 4, requires_grad=True)
    y = torch.randint(0, 6, (1, 4, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceCELoss(6)(logits.to(torch.bfloat16), y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_deep_supervision_weights_halve_with_depth_and_labels_are_downsampled():
    from hipseg_lib.loss import DeepSupervisionLoss, downsample_label

    ds = DeepSupervisionLoss(DiceCELoss(6), heads=3)
    assert ds.weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    y = torch.randint(0, 6, (2, 8, 8, 4))
    coarse = downsample_label(y, (4, 4, 2))
    assert torch.equal(coarse, y[:, 1::2, 1::2, 1::2]), "each coarse voxel takes the label at its centre"
    outs = [torch.randn(2, 6, 8, 8, 4), torch.randn(2, 6, 4, 4, 2), torch.randn(2, 6, 2, 2, 1)]
    base = DiceCELoss(6)
    expected = sum(w * base(o, downsample_label(y, o.shape[2:]) if o.shape[2:] != y.shape[1:] else y)
                   for w, o in zip(ds.weights, outs))
    assert torch.allclose(ds(outs, y), expected)
    assert torch.equal(ds(outs[0], y), base(outs[0], y)), "one tensor: the loss itself"
    with pytest.raises(ValueError, match="2 outputs for 3 head weights"):
        ds(outs[:2], y)
