"""Whether the network's probabilities mean what they say: reliability of the voxel probabilities
(a reliability diagram and the expected calibration error), and a case-level signal (how unsure the
network is inside an organ it predicts, against that organ's Dice).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["reliability_counts", "expected_calibration_error", "reliability_curve", "organ_uncertainty",
           "rank_correlation"]


def reliability_counts(probabilities: np.ndarray, truth: np.ndarray, region: np.ndarray | None = None,
                       bins: int = 10) -> np.ndarray:
    """Counts for a reliability diagram of the predicted class's probability ("confidence") against
    whether that class is right, over the voxels of ``region`` (all voxels when None).

    Args:
        probabilities: ``(C, ...)`` class probabilities (summing to one per voxel).
        truth: integer labels of the same voxels.
        region: where to count, e.g. the voxels where truth or prediction is foreground (the air
            around the patient is trivially certain and would drown everything else).
        bins: equal-width confidence bins over [0, 1].

    Returns:
        ``(bins, 3)``: per bin the summed confidence, the number right, the number of voxels. Counts of
        several volumes add up.

    Example:
        >>> p = np.array([[0.75, 0.25], [0.25, 0.75]])       # 2 classes, 2 voxels
        >>> reliability_counts(p, np.array([0, 0]), bins=2).tolist()
        [[0.0, 0.0, 0.0], [1.5, 1.0, 2.0]]
    """
    probs = np.asarray(probabilities, np.float32)
    confidence = probs.max(axis=0)
    right = probs.argmax(axis=0) == np.asarray(truth)
    if region is not None:
        confidence, right = confidence[region], right[region]
    which = np.minimum((confidence.ravel() * bins).astype(int), bins - 1)
    out = np.zeros((bins, 3))
    out[:, 0] = np.bincount(which, weights=confidence.ravel().astype(np.float64), minlength=bins)
    out[:, 1] = np.bincount(which, weights=right.ravel().astype(np.float64), minlength=bins)
    out[:, 2] = np.bincount(which, minlength=bins)
    return out


def expected_calibration_error(counts: np.ndarray) -> float:
    """ECE: the voxel-weighted mean gap between confidence and accuracy over the bins of
    :func:`reliability_counts` (0: perfectly calibrated).

    Example:
        >>> expected_calibration_error(np.array([[0.0, 0, 0], [90.0, 60, 100]]))  # says 0.9, right 0.6
        0.3
    """
    counts = np.asarray(counts, float)
    n = counts[:, 2]
    used = n > 0
    gap = np.abs(counts[used, 0] - counts[used, 1]) / n[used]
    return round(float(np.sum(gap * n[used]) / n.sum()), 12)


def reliability_curve(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean confidence, accuracy, share of voxels)`` per non-empty bin, for a reliability diagram."""
    counts = np.asarray(counts, float)
    used = counts[:, 2] > 0
    n = counts[used, 2]
    return counts[used, 0] / n, counts[used, 1] / n, n / n.sum()


def organ_uncertainty(uncertainty: np.ndarray, prediction: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """The mean of ``uncertainty`` (e.g. the normalised entropy) over the voxels predicted as each of
    ``classes``; NaN for a class not predicted. A case-level signal: one number per organ and scan.

    Example:
        >>> organ_uncertainty(np.array([0.1, 0.3, 0.9]), np.array([1, 1, 2]), (1, 2, 3)).round(2).tolist()
        [0.2, 0.9, nan]
    """
    u = np.asarray(uncertainty, np.float64)
    pred = np.asarray(prediction)
    out = np.full(len(classes), np.nan)
    for k, c in enumerate(classes):
        mask = pred == c
        if mask.any():
            out[k] = float(u[mask].mean())
    return out


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
    """Spearman's rank correlation of the pairs where both values are finite, and how many there are.

    Example:
        >>> rank_correlation([0.1, 0.2, 0.3, float("nan")], [0.9, 0.5, 0.4, 0.1])
        (-1.0, 3)
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:  # too few, or a constant: undefined
        return float("nan"), int(ok.sum())
    return float(spearmanr(a[ok], b[ok]).statistic), int(ok.sum())
