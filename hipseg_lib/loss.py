"""Soft multiclass Dice plus cross-entropy.

Plain cross-entropy leaves the small classes (prostate, rectum) at Dice 0 because the
background outnumbers them ~600 to 1; the Dice term weighs every class equally.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["soft_dice_per_class", "DiceCELoss", "DeepSupervisionLoss",
           "downsample_label"]


def soft_dice_per_class(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1e-5,
    per_sample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice of each class, over the whole batch or per sample.

    Args:
        logits: ``(N, C, X, Y, Z)`` raw scores.
        target: ``(N, X, Y, Z)`` integer labels.
        per_sample: one Dice per sample and class (``(N, C)``) instead of
            pooling the batch (``(C,)``).

    Returns:
        ``(dice, present)``: the soft Dice and whether the class occurs in
        ``target``.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), num_classes)
    onehot = onehot.movedim(-1, 1).to(probs.dtype)  # (N, C, X, Y, Z)
    dims = tuple(range(2, logits.dim()))  # the voxels
    if not per_sample:
        dims = (0, *dims)  # and the samples
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    present = onehot.sum(dims) > 0
    return dice, present


def _check_shapes(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``logits`` (N, C, X, Y, Z) fit ``target`` (N, X, Y, Z)."""
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, expected {num_classes}")
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")


class DiceCELoss(nn.Module):
    """``dice_weight * (1 - mean soft Dice) + ce_weight * cross-entropy``.

    The Dice is computed per sample and averaged over the classes present in that sample's
    target, then over the samples: a class absent from a sample has no overlap to reward, and its
    false positives are already penalised by the cross-entropy, so a perfect prediction scores ~0
    whatever classes are missing. Averaging per sample also makes the loss of a batch split over
    several processes (DistributedDataParallel) equal to the loss of the whole batch.

    Args:
        num_classes: number of classes C.
        class_weights: optional per-class weights for both terms (length C).
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.

    Example:
        >>> loss = DiceCELoss(6)
        >>> loss(torch.randn(2, 6, 8, 8, 8), torch.randint(0, 6, (2, 8, 8, 8))).item() > 0
        True
    """

    def __init__(self, num_classes: int, class_weights: Sequence[float] | None = None,
                 dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights needs {num_classes} values, got {len(class_weights)}")
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError("dice_weight and ce_weight must be >= 0 and not both 0")
        self.num_classes = num_classes
        self.dice_weight, self.ce_weight, self.smooth = dice_weight, ce_weight, smooth
        w = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", w, persistent=False)

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, target, self.num_classes)
        target = target.long()
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            ce = F.cross_entropy(logits.float(), target,
                                 weight=self.class_weights)
            loss = loss + self.ce_weight * ce
        if self.dice_weight:
            dice, present = soft_dice_per_class(logits, target, self.smooth,
                                                per_sample=True)
            w = present.float()
            if self.class_weights is not None:
                w = w * self.class_weights
            per_sample = (dice * w).sum(1) / w.sum(1).clamp_min(1e-8)
            loss = loss + self.dice_weight * (1 - per_sample.mean())
        return loss


def downsample_label(label: torch.Tensor, size) -> torch.Tensor:
    """A label map ``(N, X, Y, Z)`` on a coarser grid ``size``: each coarse
    voxel takes the label at its centre (nearest neighbour), so it stays a
    label."""
    coarse = F.interpolate(label[:, None].float(), size=tuple(size),
                           mode="nearest-exact")
    return coarse[:, 0].to(label.dtype)


class DeepSupervisionLoss(nn.Module):
    """nnU-Net's deep supervision: ``loss`` on every head's logits against the
    label downsampled to that head's grid, weighted 1, 1/2, 1/4, ... from the
    full-resolution head down, the weights normalised to sum to one.

    Given a single tensor (a network without deep supervision, or in eval
    mode) it is ``loss`` itself.

    Example:
        >>> ds = DeepSupervisionLoss(DiceCELoss(6), heads=3)
        >>> [round(w, 3) for w in ds.weights]
        [0.571, 0.286, 0.143]
    """

    def __init__(self, loss: nn.Module, heads: int):
        super().__init__()
        self.loss = loss
        raw = [0.5 ** i for i in range(heads)]
        self.weights = [w / sum(raw) for w in raw]

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        if len(outputs) != len(self.weights):
            raise ValueError(f"{len(outputs)} outputs for "
                             f"{len(self.weights)} head weights")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits in zip(self.weights, outputs):
            truth = target
            if logits.shape[2:] != target.shape[1:]:  # a coarser head
                truth = downsample_label(target, logits.shape[2:])
            total = total + weight * self.loss(logits, truth)
        return total
