"""Choosing the inference options on validation patients: test-time
mirroring and post-processing, what each buys and costs, the rule that
decides them, and how reliable each option's probabilities are."""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from . import CLASS_NAMES
from .calibration import organ_uncertainty, reliability_counts
from .io import Pair, load_pair
from .metrics import evaluate_case, patient_table
from .predictor import (
    InferenceSettings,
    Predictor,
    entropy,
    labels_from_probabilities,
)

__all__ = ["VARIANTS", "compare_inference", "inference_table",
           "choose_inference", "chosen_settings", "postprocessing_changes",
           "TOLERANCE_DICE", "TOLERANCE_HD95_MM"]

# (name, test-time mirroring, post-processing)
VARIANTS = (("plain", False, False), ("TTA", True, False),
            ("post-processing", False, True),
            ("TTA + post-processing", True, True))
# The rule's thresholds: a change of mean Dice within rounding, or of mean
# HD95 within half a millimetre (well under a voxel), is no change.
TOLERANCE_DICE = 0.002
TOLERANCE_HD95_MM = 0.5


def compare_inference(predictor: Predictor, pairs: Sequence[Pair]) -> dict:
    """Every variant of :data:`VARIANTS` on each pair: the network runs once
    plain and once mirrored (along the predictor's ``mirror_axes``);
    post-processing reuses those probabilities.

    Returns ``{"results": {variant: rows (id, case, metrics, image, truth,
    pred, spacing)}, "seconds": {variant: [per volume]}, "entropy",
    "calibration", "organ_uncertainty": {variant: per volume}}``.
    """
    keys = ("results", "seconds", "entropy", "organ_uncertainty")
    out: dict = {k: {n: [] for n, _, _ in VARIANTS} for k in keys}
    out["calibration"] = {n: np.zeros((10, 3)) for n, _, _ in VARIANTS}
    for pair in pairs:
        image, truth = load_pair(pair)
        probs, took = {}, {}
        for tta in (False, True):
            axes = predictor.settings.mirror_axes if tta else ()
            start = time.perf_counter()
            probs[tta] = predictor.replace(mirror_axes=axes).probabilities(
                image.array, image.affine)
            took[tta] = time.perf_counter() - start
        for name, tta, post in VARIANTS:
            start = time.perf_counter()
            pred = labels_from_probabilities(probs[tta], post)
            out["seconds"][name].append(took[tta] + time.perf_counter() - start)
            metrics = evaluate_case(pred, truth.array, image.spacing)
            out["results"][name].append({
                "id": str(pair.id), "case": pair.id.case, "metrics": metrics,
                "image": image.array, "truth": truth.array, "pred": pred,
                "spacing": image.spacing})
            u = entropy(probs[tta]).astype(np.float16)
            out["entropy"][name].append(u)
            out["organ_uncertainty"][name].append(
                organ_uncertainty(u, pred, range(1, len(CLASS_NAMES))))
            organs = (truth.array > 0) | (pred > 0)  # not the air around
            out["calibration"][name] += reliability_counts(
                probs[tta], truth.array, organs)
    return out


def inference_table(comparison: dict, metric: str = "dice") -> list[dict]:
    """One row per variant: its seconds per volume and each foreground
    class's ``metric``, the mean over patients (as results are reported)."""
    rows = []
    for name, results in comparison["results"].items():
        _, table = patient_table(results, metric)
        with np.errstate(all="ignore"):
            means = np.nanmean(table, axis=0)
        rows.append({"inference": name,
                     "s/volume": float(np.mean(comparison["seconds"][name])),
                     **dict(zip(CLASS_NAMES[1:], means.tolist()))})
    return rows


def choose_inference(comparison: dict, tol_dice: float = TOLERANCE_DICE,
                     tol_hd95_mm: float = TOLERANCE_HD95_MM,
                     ) -> tuple[str, list[str]]:
    """The options the validation patients support, by one rule, with the
    reasons in words.

    - **Mirroring** stays on unless it lowers a foreground class's mean Dice
      by more than ``tol_dice``: it is nnU-Net's default and the network was
      trained on mirrored scans.
    - **Post-processing** is switched on only when it makes some class
      better by more than ``tol_dice`` of mean Dice or ``tol_hd95_mm`` of
      mean HD95 (a stray piece far from its organ barely moves Dice but
      ruins HD95) and none worse: on a scan whose field of view cuts an
      organ in two it would delete a true piece.
    """
    dice = {r["inference"]: r for r in inference_table(comparison, "dice")}
    hd = {r["inference"]: r for r in inference_table(comparison, "hd95")}
    classes = CLASS_NAMES[1:]

    def gain(name: str) -> tuple[dict, dict]:  # positive: better
        return ({c: dice[name][c] - dice["plain"][c] for c in classes},
                {c: hd["plain"][c] - hd[name][c] for c in classes})

    tta_dice, _ = gain("TTA")
    worst = min(classes, key=lambda c: tta_dice[c])
    tta = tta_dice[worst] >= -tol_dice
    reasons = [f"mirroring {'on' if tta else 'off'}: worst class {worst}, "
               f"{tta_dice[worst]:+.4f} mean Dice"]
    post_dice, post_hd = gain("post-processing")
    better = [c for c in classes if post_dice[c] > tol_dice
              or post_hd[c] > tol_hd95_mm]
    worse = [c for c in classes if post_dice[c] < -tol_dice
             or post_hd[c] < -tol_hd95_mm]
    post = bool(better) and not worse
    moved = f"{len(better)} class(es) better, {len(worse)} worse" \
        if better or worse else "no class moved beyond the tolerances"
    reasons.append(f"post-processing {'on' if post else 'off'}: {moved}")
    reasons += [f"  {c}: {post_dice[c]:+.4f} mean Dice, "
                f"{-post_hd[c]:+.1f} mm mean HD95" for c in better + worse]
    name = next(n for n, t, p in VARIANTS if (t, p) == (tta, post))
    return name, reasons


def chosen_settings(predictor: Predictor, variant: str) -> InferenceSettings:
    """The predictor's settings with the options of ``variant``."""
    tta, post = next((t, p) for n, t, p in VARIANTS if n == variant)
    axes = predictor.settings.mirror_axes if tta else ()
    return predictor.replace(mirror_axes=axes, postprocess=post).settings


def postprocessing_changes(before: Sequence[dict], after: Sequence[dict]
                           ) -> list[dict]:
    """Where post-processing changed a prediction: one row per volume and
    class removed, with its voxels and the axial slice where most went,
    the largest change first."""
    rows = []
    for i, (b, a) in enumerate(zip(before, after)):
        changed = b["pred"] != a["pred"]
        for c in np.unique(b["pred"][changed]):
            gone = changed & (b["pred"] == c)
            rows.append({"index": i, "id": b["id"],
                         "class": CLASS_NAMES[int(c)],
                         "voxels": int(gone.sum()),
                         "slice": int(np.argmax(gone.sum((0, 1))))})
    return sorted(rows, key=lambda r: -r["voxels"])
