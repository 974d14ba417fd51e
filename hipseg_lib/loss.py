"""The loss: soft Dice plus cross-entropy, and deep supervision around it.

Plain cross-entropy leaves the small organs (prostate, rectum) behind, since
the background outnumbers them hundreds to one; the Dice term weighs every
class equally.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["soft_dice_per_class", "DiceCELoss", "downsample_label",
           "DeepSupervisionLoss"]


def soft_dice_per_class(logits: torch.Tensor, target: torch.Tensor,
                        smooth: float = 1e-5
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The soft Dice of each sample and class, ``(N, C)``, and whether the
    class is in that sample's truth.

    Args:
        logits: ``(N, C, X, Y, Z)`` class scores.
        target: ``(N, X, Y, Z)`` class numbers.
    """
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1])  # (N, X, Y, Z, C)
    onehot = onehot.movedim(-1, 1).float()               # (N, C, X, Y, Z)
    voxels = tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(voxels)
    denom = probs.sum(voxels) + onehot.sum(voxels)
    dice = (2 * inter + smooth) / (denom + smooth)
    return dice, onehot.sum(voxels) > 0


class DiceCELoss(nn.Module):
    """``ce_weight * cross-entropy + dice_weight * (1 - mean soft Dice)``.

    The Dice is averaged over the classes present in each sample's truth,
    then over the samples: a class a sample lacks has no overlap to reward
    (its false positives cost cross-entropy), so a perfect prediction scores
    about 0, and a batch split over several processes gets the same loss.

    Example:
        >>> loss = DiceCELoss(6)
        >>> x, y = torch.randn(2, 6, 4, 4, 4), torch.randint(0, 6, (2, 4, 4, 4))
        >>> loss(x, y).item() > 0
        True
    """

    def __init__(self, num_classes: int,
                 class_weights: Sequence[float] | None = None,
                 dice_weight: float = 1.0, ce_weight: float = 1.0,
                 smooth: float = 1e-5):
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError("dice_weight and ce_weight must be >= 0 and "
                             "not both 0")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights needs {num_classes} values")
        self.num_classes, self.smooth = num_classes, smooth
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.class_weights: torch.Tensor | None
        weights = None if class_weights is None else torch.tensor(
            class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes or \
                logits.shape[2:] != target.shape[1:]:
            raise ValueError(f"logits {tuple(logits.shape)} do not fit "
                             f"target {tuple(target.shape)} and "
                             f"{self.num_classes} classes")
        target = target.long()
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            ce = F.cross_entropy(logits.float(), target,
                                 weight=self.class_weights)
            loss = loss + self.ce_weight * ce
        if self.dice_weight:
            dice, present = soft_dice_per_class(logits, target, self.smooth)
            w = present.float()  # 1 for the classes in each sample's truth
            if self.class_weights is not None:
                w = w * self.class_weights
            per_sample = (dice * w).sum(1) / w.sum(1).clamp_min(1e-8)
            loss = loss + self.dice_weight * (1 - per_sample.mean())
        return loss


def downsample_label(label: torch.Tensor, size) -> torch.Tensor:
    """A label map ``(N, X, Y, Z)`` on a coarser grid ``size``: each coarse
    voxel takes the label at its centre, so it stays a label."""
    coarse = F.interpolate(label[:, None].float(), size=tuple(size),
                           mode="nearest-exact")
    return coarse[:, 0].to(label.dtype)


class DeepSupervisionLoss(nn.Module):
    """Deep supervision, as nnU-Net does it: ``loss`` on every head's logits
    against the label downsampled to that head's grid, weighted 1, 1/2,
    1/4, ... from the full-resolution head down, the weights normalised to
    sum to one. Given one tensor (a network in eval mode, or one with a
    single head), it is ``loss`` itself.

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
