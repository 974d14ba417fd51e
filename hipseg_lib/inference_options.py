"""Choosing the inference options on validation cases: test-time mirroring and post-processing,
what each buys and costs, the rule that decides them, and what the probabilities say about their
own reliability (calibration and a case-level uncertainty signal).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from . import CLASS_NAMES
from .calibration import organ_uncertainty, reliability_counts
from .io import Pair, load_pair
from .metrics import evaluate_case
from .predictor import Predictor, entropy, labels_from_probabilities

__all__ = ["VARIANTS", "variant_named", "compare_inference", "inference_table", "choose_inference",
           "chosen_settings", "postprocessing_changes", "TOLERANCE_DICE", "TOLERANCE_HD95_MM"]

# (name, test-time mirroring, post-processing)
VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    ("plain", False, False), ("TTA", True, False), ("post-processing", False, True),
    ("TTA + post-processing", True, True))
# The rule's thresholds: a change of mean Dice within rounding, or of mean HD95 within half a millimetre
# (well under a voxel), is no change.
TOLERANCE_DICE = 0.002
TOLERANCE_HD95_MM = 0.5


def variant_named(tta: bool, postprocess: bool) -> str:
    """The name in :data:`VARIANTS` of a combination of options."""
    return next(n for n, t, p in VARIANTS if (t, p) == (tta, postprocess))


def _progress(items, progress: bool):
    if not progress:
        return items
    from .progress import progress as tqdm
    return tqdm(items, desc="inference options", unit="vol", leave=False)


def compare_inference(predictor: Predictor, pairs: Sequence[Pair], variants=VARIANTS,
                      progress: bool = False) -> dict:
    """Score every inference variant (see :data:`VARIANTS`) on each pair, with seconds per volume, and
    gather how reliable each variant's probabilities are.

    The network runs once without and once with mirroring (along the predictor's
    ``mirror_axes``, those its training mirrored); post-processing reuses those probabilities, and
    its own time is added to theirs.

    Returns:
        ``{"results": {variant: rows (id, case, metrics, image, truth, pred, spacing)},
        "seconds": {variant: [s per volume]}, "entropy": {variant: [per pair, float16 normalised
        entropy]}, "calibration": {variant: reliability counts over the voxels where truth or
        prediction is foreground (:func:`~hipseg_lib.calibration.reliability_counts`)},
        "organ_uncertainty": {variant: [per pair, the mean entropy inside each predicted foreground
        class]}}``.
    """
    names = [name for name, _, _ in variants]
    results: dict[str, list[dict]] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    entropies: dict[str, list[np.ndarray]] = {name: [] for name in names}
    organs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    counts = {name: np.zeros((10, 3)) for name in names}
    for pair in _progress(pairs, progress):
        image, truth = load_pair(pair)
        probs, net_time, unc = {}, {}, {}
        for tta in sorted({t for _, t, _ in variants}):
            start = time.perf_counter()
            axes = predictor.settings.mirror_axes if tta else ()
            probs[tta] = predictor.replace(mirror_axes=axes).probabilities(image.array, image.affine)
            net_time[tta] = time.perf_counter() - start
            unc[tta] = entropy(probs[tta]).astype(np.float16)
        scored: list[tuple[np.ndarray, dict]] = []  # a label map equal to an earlier one is not re-scored
        for name, tta, post in variants:
            start = time.perf_counter()
            pred = labels_from_probabilities(probs[tta], post)
            seconds[name].append(net_time[tta] + time.perf_counter() - start)
            metrics = next((m for p, m in scored if np.array_equal(p, pred)), None)
            if metrics is None:
                metrics = evaluate_case(pred, truth.array, image.spacing)
                scored.append((pred, metrics))
            results[name].append({"id": str(pair.id), "case": pair.id.case, "metrics": metrics,
                                  "image": image.array, "truth": truth.array, "pred": pred,
                                  "spacing": image.spacing})
            counts[name] += reliability_counts(probs[tta], truth.array, (truth.array > 0) | (pred > 0))
            organs[name].append(organ_uncertainty(unc[tta], pred, range(1, len(CLASS_NAMES))))
            entropies[name].append(unc[tta])
        del probs
    return {"results": results, "seconds": seconds, "entropy": entropies, "calibration": counts,
            "organ_uncertainty": organs}


def inference_table(comparison: dict, metric: str = "dice") -> list[dict]:
    """One row per variant: mean seconds per volume and the mean ``metric`` per foreground class."""
    rows = []
    for name, res in comparison["results"].items():
        values = np.array([r["metrics"][metric] for r in res], dtype=float)
        with np.errstate(all="ignore"):
            means = np.nanmean(values, axis=0)
        rows.append({"inference": name, "s/volume": float(np.mean(comparison["seconds"][name])),
                     **{n: float(m) for n, m in zip(CLASS_NAMES[1:], means[1:])}})
    return rows


def choose_inference(comparison: dict) -> tuple[str, list[str]]:
    """The inference options the validation cases support, by one rule, with the reasons in words.

    - **Test-time mirroring** is on when it lowers no foreground class's mean Dice by more than
      :data:`TOLERANCE_DICE`: it costs a second pass, and averaging two predictions rarely hurts.
    - **Post-processing** (keep each single organ's largest piece) is on when it improves some class,
      by more than :data:`TOLERANCE_DICE` of mean Dice or :data:`TOLERANCE_HD95_MM` of mean HD95 (a
      stray piece far from its organ barely moves Dice but ruins HD95), and worsens none by more than
      those. Otherwise it stays off: on a scan whose field of view cuts an organ in two it would
      delete a true piece, a risk not worth taking for nothing.

    Args:
        comparison: :func:`compare_inference` of every variant in :data:`VARIANTS`.

    Returns:
        ``(variant name, reasons)``.
    """
    dice = {r["inference"]: r for r in inference_table(comparison, "dice")}
    hd = {r["inference"]: r for r in inference_table(comparison, "hd95")}
    classes = CLASS_NAMES[1:]

    def change(name: str) -> tuple[dict, dict]:
        return ({c: dice[name][c] - dice["plain"][c] for c in classes},
                {c: hd["plain"][c] - hd[name][c] for c in classes})  # positive: better

    tta_dice, _ = change("TTA")
    worst = min(tta_dice, key=lambda c: tta_dice[c])
    tta = tta_dice[worst] >= -TOLERANCE_DICE
    cost = np.mean(comparison["seconds"]["TTA"]) / np.mean(comparison["seconds"]["plain"])
    reasons = [f"mirroring {'on' if tta else 'off'}: worst class {worst}, "
               f"{tta_dice[worst]:+.4f} mean Dice ({cost:.2f}x the time)"]
    post_dice, post_hd = change("post-processing")
    better = [c for c in classes if post_dice[c] > TOLERANCE_DICE or post_hd[c] > TOLERANCE_HD95_MM]
    worse = [c for c in classes if post_dice[c] < -TOLERANCE_DICE or post_hd[c] < -TOLERANCE_HD95_MM]
    post = bool(better) and not worse
    reasons.append(f"post-processing {'on' if post else 'off'}: "
                   + (f"{len(better)} class(es) better, {len(worse)} worse" if better or worse
                      else "no class moved beyond the tolerances"))
    reasons += [f"  {c}: {post_dice[c]:+.4f} mean Dice, mean HD95 {-post_hd[c]:+.1f} mm" for c in better + worse]
    return variant_named(tta, post), reasons


def postprocessing_changes(before: Sequence[dict], after: Sequence[dict]) -> list[dict]:
    """Where post-processing changed a prediction: one row per volume and removed class with the
    voxels it took away and the axial slice where it took most, largest change first."""
    rows = []
    for i, (b, a) in enumerate(zip(before, after)):
        changed = b["pred"] != a["pred"]
        for c in np.unique(b["pred"][changed]):
            m = changed & (b["pred"] == c)
            rows.append({"index": i, "id": b["id"], "class": CLASS_NAMES[int(c)], "voxels": int(m.sum()),
                         "slice": int(np.argmax(m.sum((0, 1))))})
    return sorted(rows, key=lambda r: -r["voxels"])


def chosen_settings(predictor: Predictor, variant: str):
    """The predictor's inference settings with the options of ``variant`` (a name in :data:`VARIANTS`)."""
    tta, post = next((t, p) for n, t, p in VARIANTS if n == variant)
    settings = predictor.replace(postprocess=post).settings
    return settings if tta else predictor.replace(mirror_axes=(), postprocess=post).settings
