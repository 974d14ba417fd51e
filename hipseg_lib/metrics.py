"""Segmentation metrics per class: Dice, IoU, HD95 and average surface distance (mm).

A class absent from both the truth and the prediction is excluded (NaN), never a free
1.0. When a class is in one and not the other, Dice and IoU are 0 and the distances take
the volume's diagonal in mm (the worst possible value) rather than infinity, so that
means stay finite and a miss still counts against the model.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Sequence

import numpy as np
from scipy import ndimage

from . import CLASS_NAMES, NUM_CLASSES

__all__ = ["dice_per_class", "iou_per_class", "surface_distances", "hd95", "average_surface_distance",
           "normalised_surface_distance", "evaluate_case", "summarise", "METRICS", "NSD_TOLERANCE_MM",
           "patient_table", "bootstrap_interval", "per_patient_summary"]

METRICS = ("dice", "iou", "hd95", "asd", "nsd")
NSD_TOLERANCE_MM = 2.0  # the normalised surface distance's tolerance


def _counts(pred: np.ndarray, truth: np.ndarray, num_classes: int):
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth "
                         f"shape {truth.shape}")
    # the confusion matrix: cm[t, p] voxels of class t predicted as p
    k = num_classes
    idx = truth.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel()
    cm = np.bincount(idx, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    return tp, cm.sum(0) - tp, cm.sum(1) - tp  # tp, fp, fn


def dice_per_class(pred: np.ndarray, truth: np.ndarray,
                   num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dice ``2|P∩T| / (|P| + |T|)`` per class; NaN where a class is in
    neither.

    Example:
        >>> dice_per_class(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
        array([0.66666667, 0.66666667,        nan])
    """
    tp, fp, fn = _counts(pred, truth, num_classes)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def iou_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Intersection over union per class; NaN where a class is in neither."""
    tp, fp, fn = _counts(pred, truth, num_classes)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                          border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float],
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of
    ``b``, and back.

    Both masks must be non-empty. The work is done inside the box that holds
    both masks (plus a one-voxel margin, so that surfaces are found exactly
    as on the whole volume): distances between surface voxels do not depend
    on what lies outside it.
    """
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    box = _bounding_box(a | b)
    a, b = a[box], b[box]
    sa, sb = _border(a), _border(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return dist_to_b[sa], dist_to_a[sb]


def _hd95(x: np.ndarray, y: np.ndarray) -> float:
    return float(max(np.percentile(x, 95), np.percentile(y, 95)))


def _asd(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.concatenate([x, y]).mean())


def _nsd(x: np.ndarray, y: np.ndarray, tolerance: float = NSD_TOLERANCE_MM) -> float:
    return float(((x <= tolerance).sum() + (y <= tolerance).sum()) / (x.size + y.size))


def _distance_metrics(a, b, spacing, reducers) -> list[float]:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return [float("nan")] * len(reducers)
    if not a.any() or not b.any():  # a missed (or invented) structure: the worst value there is
        diagonal = float(np.linalg.norm(np.array(a.shape) * np.asarray(spacing, float)))
        return [0.0 if getattr(reduce, "func", reduce) is _nsd else diagonal for reduce in reducers]
    d_ab, d_ba = surface_distances(a, b, spacing)
    return [reduce(d_ab, d_ba) for reduce in reducers]


def hd95(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm: the larger of the two directed
    95th percentiles (as MONAI's ``compute_hausdorff_distance(percentile=95)``)."""
    return _distance_metrics(pred_mask, truth_mask, spacing, [_hd95])[0]


def normalised_surface_distance(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float],
                                tolerance: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface distance (surface Dice, Nikolov et al. 2021): the share of both surfaces'
    voxels that lie within ``tolerance`` mm of the other surface (as MONAI's
    ``compute_surface_dice``). 1 when every boundary is within the tolerance; 0 when one mask is
    empty and the other not; NaN when both are.

    Example:
        >>> a = np.zeros((12, 1, 1), bool); a[2:8] = True
        >>> b = np.zeros_like(a); b[2:10] = True  # two voxels too long, 2 mm each
        >>> round(normalised_surface_distance(b, a, (2.0, 2.0, 2.0)), 3)  # (7 + 6) / (8 + 6)
        0.929
    """
    return _distance_metrics(pred_mask, truth_mask, spacing, [partial(_nsd, tolerance=tolerance)])[0]


def average_surface_distance(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric average surface distance in mm (mean over both surfaces' distances)."""
    return _distance_metrics(pred_mask, truth_mask, spacing, [_asd])[0]


def evaluate_case(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                  num_classes: int = NUM_CLASSES, distances: bool = True) -> dict[str, np.ndarray]:
    """All metrics for one case: ``{"dice": [C], "iou": [C], "hd95": [C], "asd": [C], "nsd": [C]}``
    (``nsd`` at :data:`NSD_TOLERANCE_MM`)."""
    out = {"dice": dice_per_class(pred, truth, num_classes), "iou": iou_per_class(pred, truth, num_classes)}
    if distances:
        pred, truth = np.asarray(pred), np.asarray(truth)
        three = np.array([_distance_metrics(pred == c, truth == c, spacing, [_hd95, _asd, _nsd])
                          for c in range(num_classes)]).reshape(num_classes, 3)
        out["hd95"], out["asd"], out["nsd"] = three[:, 0], three[:, 1], three[:, 2]
    return out


def summarise(cases: Sequence[dict[str, np.ndarray]], class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Aggregate per-case metrics: for each metric and class the mean, std, median and the
    number of cases that counted (NaN entries are skipped)."""
    out: dict = {}
    if not cases:
        return out
    for metric in cases[0]:
        table = np.stack([c[metric] for c in cases]).astype(float)
        per_class = {}
        for k, name in enumerate(class_names):
            col = table[:, k][~np.isnan(table[:, k])]
            per_class[name] = {
                "mean": float(col.mean()) if col.size else None,
                "std": float(col.std()) if col.size else None,
                "median": float(np.median(col)) if col.size else None,
                "n": int(col.size),
            }
        out[metric] = per_class
    return out


def patient_table(rows: Sequence[dict], metric: str = "dice",
                  classes: Sequence[int] = tuple(range(1, NUM_CLASSES))) -> tuple[list[str], np.ndarray]:
    """One row per patient: the mean of ``metric`` over that patient's volumes, for ``classes`` (the
    foreground by default). Weekly scans of one patient are not independent, so a patient, not a
    volume, is the unit of a confidence interval.

    Args:
        rows: per-volume results, each with ``"case"`` and ``"metrics"`` (``{metric: [C values]}``).

    Returns:
        ``(patients, table)``: sorted patient IDs and a ``(patients, len(classes))`` array (NaN where a
        class was absent from every volume of a patient).

    Example:
        >>> rows = [{"case": "a", "metrics": {"dice": [1, .8, .6]}}, {"case": "a", "metrics": {"dice": [1, .6, .6]}},
        ...         {"case": "b", "metrics": {"dice": [1, .9, .3]}}]
        >>> patient_table(rows, classes=(1, 2))[1].round(2).tolist()
        [[0.7, 0.6], [0.9, 0.3]]
    """
    cases = sorted({r["case"] for r in rows})
    table = np.full((len(cases), len(classes)), np.nan)
    for i, case in enumerate(cases):
        values = np.array([np.asarray(r["metrics"][metric], float)[list(classes)] for r in rows if r["case"] == case])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from all of a patient's scans
            table[i] = np.nanmean(values, axis=0)
    return cases, table


def bootstrap_interval(table: np.ndarray, level: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap confidence interval of each column's mean, resampling the *rows* (the
    independent units: patients) with replacement.

    With few units the interval is wide and coarse: 3 patients allow only 10 different resamples, so
    it says how far the mean could move with other patients of the same kind, not more.

    Returns:
        ``(low, high)`` per column.

    Example:
        >>> low, high = bootstrap_interval(np.array([[0.5], [0.5], [0.5]]))  # identical patients
        >>> float(low[0]), float(high[0])
        (0.5, 0.5)
    """
    table = np.asarray(table, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(table), size=(resamples, len(table)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where a column is all NaN
        means = np.nanmean(table[idx], axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return low, high


def per_patient_summary(rows: Sequence[dict], metric: str = "dice", class_names: Sequence[str] = CLASS_NAMES,
                        level: float = 0.95) -> dict:
    """The foreground classes' ``metric`` as the field reports it: per class the mean over patients (each
    patient the mean of its volumes), its ``level`` bootstrap interval over patients, the mean over
    volumes, and each patient's value.

    Returns:
        ``{class: {"mean", "low", "high", "volume_mean", "patients": {case: value}}}``.
    """
    classes = tuple(range(1, len(class_names)))
    cases, table = patient_table(rows, metric, classes)
    low, high = bootstrap_interval(table, level)
    volumes = np.array([np.asarray(r["metrics"][metric], float)[list(classes)] for r in rows])
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k, c in enumerate(classes):
            col = table[:, k]
            out[class_names[c]] = {
                "mean": _finite(np.nanmean(col)), "low": _finite(low[k]), "high": _finite(high[k]),
                "volume_mean": _finite(np.nanmean(volumes[:, k])),
                "patients": {case: _finite(v) for case, v in zip(cases, col)}}
    return out


def _finite(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None
