"""Whether the network's probabilities mean what they say: the reliability of
voxel probabilities (a reliability diagram and the expected calibration
error), and a signal per scan (how unsure the network is inside an organ it
predicts, against that organ's Dice)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["reliability_counts", "expected_calibration_error",
           "reliability_curve", "organ_uncertainty", "rank_correlation"]


def reliability_counts(probabilities: np.ndarray, truth: np.ndarray,
                       region: np.ndarray | None = None,
                       bins: int = 10) -> np.ndarray:
    """For a reliability diagram: the voxels of ``region`` (all if None)
    binned by the probability of their predicted class (the confidence).
    Returns ``(bins, 3)``: per bin the summed confidence, how many were
    right, how many there are; the counts of several scans add up.

    Example:
        >>> p = np.array([[0.75, 0.25], [0.25, 0.75]])  # 2 classes, 2 voxels
        >>> reliability_counts(p, np.array([0, 0]), bins=2).tolist()
        [[0.0, 0.0, 0.0], [1.5, 1.0, 2.0]]
    """
    probs = np.asarray(probabilities, np.float32)
    confidence = probs.max(axis=0)
    right = probs.argmax(axis=0) == np.asarray(truth)
    if region is not None:
        confidence, right = confidence[region], right[region]
    which = np.minimum((confidence.ravel() * bins).astype(int), bins - 1)
    return np.stack([
        np.bincount(which, confidence.ravel().astype(float), minlength=bins),
        np.bincount(which, right.ravel().astype(float), minlength=bins),
        np.bincount(which, minlength=bins).astype(float)], axis=1)


def expected_calibration_error(counts: np.ndarray) -> float:
    """ECE: the gap between confidence and accuracy in each bin of
    :func:`reliability_counts`, averaged with the bins' voxels as weights.

    Example:
        >>> expected_calibration_error(np.array([[90.0, 60, 100]]))
        0.3
    """
    counts = np.asarray(counts, float)
    used = counts[:, 2] > 0
    gap = np.abs(counts[used, 0] - counts[used, 1])  # per bin, times voxels
    return round(float(gap.sum() / counts[:, 2].sum()), 12)


def reliability_curve(counts: np.ndarray):
    """Per non-empty bin: the mean confidence, the accuracy, the share of
    voxels."""
    counts = np.asarray(counts, float)
    used = counts[:, 2] > 0
    n = counts[used, 2]
    return counts[used, 0] / n, counts[used, 1] / n, n / n.sum()


def organ_uncertainty(uncertainty: np.ndarray, prediction: np.ndarray,
                      classes: Sequence[int]) -> np.ndarray:
    """The mean of ``uncertainty`` (e.g. the entropy) over the voxels
    predicted as each of ``classes``; NaN for a class not predicted.

    Example:
        >>> u, pred = np.array([0.1, 0.3, 0.9]), np.array([1, 1, 2])
        >>> organ_uncertainty(u, pred, (1, 2, 3)).round(2).tolist()
        [0.2, 0.9, nan]
    """
    pred = np.asarray(prediction)
    return np.array([float(np.mean(uncertainty[pred == c]))
                     if (pred == c).any() else np.nan for c in classes])


def rank_correlation(x: Sequence[float], y: Sequence[float]
                     ) -> tuple[float, int]:
    """Spearman's rank correlation of the pairs where both are finite, and
    how many there are (NaN when fewer than 3, or either is constant).

    Example:
        >>> rank_correlation([0.1, 0.2, 0.3, np.nan], [0.9, 0.5, 0.4, 0.1])
        (-1.0, 3)
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan"), int(ok.sum())
    return float(spearmanr(a[ok], b[ok]).statistic), int(ok.sum())
