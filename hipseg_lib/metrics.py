"""Segmentation metrics per class, and how to report them over patients.

Dice and IoU (overlap); HD95, the average surface distance and the normalised
surface distance (boundaries, in mm), each computed over the boundary voxels
of the two masks, as MONAI's functions are. A class in neither truth nor
prediction is left out (NaN), never a free 1.0; a class in only one of them
scores Dice 0 and the volume's diagonal as its distances (the worst value).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from . import CLASS_NAMES, NUM_CLASSES

__all__ = ["confusion_matrix", "dice_from_confusion", "dice_per_class",
           "iou_per_class", "surface_distances", "hd95",
           "average_surface_distance", "normalised_surface_distance",
           "evaluate_case", "METRICS", "NSD_TOLERANCE_MM", "patient_table",
           "bootstrap_interval", "per_patient_summary"]

METRICS = ("dice", "iou", "hd95", "asd", "nsd")
FOREGROUND_CLASSES = tuple(range(1, NUM_CLASSES))  # the classes tables report
NSD_TOLERANCE_MM = 2.0  # the normalised surface distance's tolerance


def confusion_matrix(pred: np.ndarray, truth: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """The confusion matrix ``cm[t, p]``: how many voxels of class t were
    predicted p."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from "
                         f"truth shape {truth.shape}")
    k = num_classes
    idx = truth.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=k * k).reshape(k, k)


def _counts(cm: np.ndarray):
    """True positives, false positives and false negatives of each class,
    from a confusion matrix ``cm[t, p]``."""
    tp = np.diag(cm).astype(np.float64)
    return tp, cm.sum(0) - tp, cm.sum(1) - tp


def dice_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Dice ``2 TP / (2 TP + FP + FN)`` per class of a confusion matrix;
    NaN where a class is in neither prediction nor truth."""
    tp, fp, fn = _counts(cm)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def dice_per_class(pred: np.ndarray, truth: np.ndarray,
                   num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dice per class of a label map against the truth.

    Example:
        >>> dice_per_class(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
        array([0.66666667, 0.66666667,        nan])
    """
    return dice_from_confusion(confusion_matrix(pred, truth, num_classes))


def iou_per_class(pred: np.ndarray, truth: np.ndarray,
                  num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Intersection over union ``TP / (TP + FP + FN)`` per class."""
    tp, fp, fn = _counts(confusion_matrix(pred, truth, num_classes))
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def _border(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary voxels: those with a face-neighbour outside it."""
    inside = ndimage.binary_erosion(
        mask, ndimage.generate_binary_structure(3, 1), border_value=0)
    return mask & ~inside


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each boundary voxel of ``a`` to the nearest of
    ``b``'s, and back; both masks non-empty. Only the box that holds both
    (and a voxel of margin) is searched: nothing outside it is nearer."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    box = []
    for axis in range(3):  # the rows along this axis that hold either mask
        rows = np.flatnonzero((a | b).any(axis=tuple({0, 1, 2} - {axis})))
        box.append(slice(max(int(rows[0]) - 1, 0), int(rows[-1]) + 2))
    sa, sb = _border(a[tuple(box)]), _border(b[tuple(box)])
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return to_b[sa], to_a[sb]


def _hd95(x: np.ndarray, y: np.ndarray) -> float:
    """The larger of the two directed 95th percentiles."""
    return float(max(np.percentile(x, 95), np.percentile(y, 95)))


def _asd(x: np.ndarray, y: np.ndarray) -> float:
    """The mean over both boundaries' distances."""
    return float(np.concatenate([x, y]).mean())


def _nsd(x: np.ndarray, y: np.ndarray) -> float:
    """The share of both boundaries' voxels within the tolerance."""
    near = (x <= NSD_TOLERANCE_MM).sum() + (y <= NSD_TOLERANCE_MM).sum()
    return float(near / (x.size + y.size))


def _distances(pred, truth, spacing) -> list[float]:
    """HD95, ASD and NSD of one class's masks (NaN when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return [np.nan] * 3
    if not pred.any() or not truth.any():  # a miss: the worst values
        diagonal = float(np.linalg.norm(np.multiply(pred.shape, spacing)))
        return [diagonal, diagonal, 0.0]
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    return [_hd95(d_pt, d_tp), _asd(d_pt, d_tp), _nsd(d_pt, d_tp)]


def hd95(pred_mask, truth_mask, spacing) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of boundary voxels,
    as MONAI's ``compute_hausdorff_distance(percentile=95)``."""
    return _distances(pred_mask, truth_mask, spacing)[0]


def average_surface_distance(pred_mask, truth_mask, spacing) -> float:
    """Symmetric average surface distance (mm) of boundary voxels."""
    return _distances(pred_mask, truth_mask, spacing)[1]


def normalised_surface_distance(pred_mask, truth_mask, spacing) -> float:
    """The share of both masks' boundary voxels within
    :data:`NSD_TOLERANCE_MM` of the other boundary: the normalised surface
    distance (Nikolov et al. 2021) counted over voxels, as MONAI's
    ``compute_surface_dice``; Nikolov's own weighs surface area instead.

    Example:
        >>> a = np.zeros((12, 1, 1), bool); a[2:8] = True
        >>> b = np.zeros_like(a); b[2:10] = True  # two 2-mm voxels too long
        >>> round(normalised_surface_distance(b, a, (2, 2, 2)), 3)  # 13 / 14
        0.929
    """
    return _distances(pred_mask, truth_mask, spacing)[2]


def evaluate_case(pred: np.ndarray, truth: np.ndarray, spacing,
                  num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
    """Every metric of one case, each an array with one value per class:
    ``{"dice", "iou", "hd95", "asd", "nsd"}``."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    dist = np.array([_distances(pred == c, truth == c, spacing)
                     for c in range(num_classes)])
    return {"dice": dice_per_class(pred, truth, num_classes),
            "iou": iou_per_class(pred, truth, num_classes),
            "hd95": dist[:, 0], "asd": dist[:, 1], "nsd": dist[:, 2]}


def patient_table(rows: Sequence[dict], metric: str = "dice",
                  classes=FOREGROUND_CLASSES) -> tuple[list[str], np.ndarray]:
    """One row per patient: the mean of ``metric`` over that patient's
    volumes, for ``classes``. Weekly scans of one patient are not
    independent: a patient, not a volume, is the unit of an interval.

    Args:
        rows: per-volume results, each with ``"case"`` and ``"metrics"``.

    Example:
        >>> rows = [{"case": "a", "metrics": {"dice": [1, .8]}},
        ...         {"case": "a", "metrics": {"dice": [1, .6]}},
        ...         {"case": "b", "metrics": {"dice": [1, .9]}}]
        >>> patient_table(rows, classes=(1,))[1].round(2).tolist()
        [[0.7], [0.9]]
    """
    cases = sorted({r["case"] for r in rows})
    table = np.full((len(cases), len(classes)), np.nan)
    for i, case in enumerate(cases):
        values = np.array([np.asarray(r["metrics"][metric])[list(classes)]
                           for r in rows if r["case"] == case], dtype=float)
        with warnings.catch_warnings():  # a class none of its scans has
            warnings.simplefilter("ignore", RuntimeWarning)
            table[i] = np.nanmean(values, axis=0)
    return cases, table


def bootstrap_interval(table: np.ndarray, level: float = 0.95,
                       resamples: int = 10000, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A percentile-bootstrap interval of each column's mean: the rows (the
    patients) are drawn with replacement ``resamples`` times, the mean taken
    each time, and the middle ``level`` of those means kept.

    Example:
        >>> low, high = bootstrap_interval(np.array([[0.5], [0.5]]))
        >>> float(low[0]), float(high[0])
        (0.5, 0.5)
    """
    table = np.asarray(table, float)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(table), size=(resamples, len(table)))
    with warnings.catch_warnings():  # a draw where a column is all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(table[drawn], axis=1)  # (resamples, columns)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return low, high


def per_patient_summary(rows: Sequence[dict], metric: str = "dice",
                        level: float = 0.95) -> dict:
    """Each foreground class's ``metric`` as the field reports it: the mean
    over patients, its bootstrap interval over patients, the mean over
    volumes, and each patient's value (None where there is none)."""
    classes = tuple(range(1, len(CLASS_NAMES)))
    cases, table = patient_table(rows, metric, classes)
    low, high = bootstrap_interval(table, level)
    volumes = np.array([np.asarray(r["metrics"][metric], float)[list(classes)]
                        for r in rows])
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k, c in enumerate(classes):
            out[CLASS_NAMES[c]] = {
                "mean": _number(np.nanmean(table[:, k])),
                "low": _number(low[k]), "high": _number(high[k]),
                "volume_mean": _number(np.nanmean(volumes[:, k])),
                "patients": {p: _number(v) for p, v in zip(cases, table[:, k])}}
    return out


def _number(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None
