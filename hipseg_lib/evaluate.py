"""Scoring predictions against truths: a checkpoint on labelled pairs, or two folders of label maps,
and the comparison of inference options (test-time mirroring, post-processing) with their cost.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import CLASS_NAMES, HipsegError
from ._atomic import write_json_atomic
from .io import Pair, load_pair, load_volume, volume_id_in
from .metrics import METRICS, evaluate_case, summarise
from .model import ResUNet3D
from . import DEFAULT_POSTPROCESS, DEFAULT_TTA
from .portable import _stem, collect_inputs, entropy, labels_from_probabilities
from .predict import predict_array, predict_probabilities
from .preprocess import Preprocessing

__all__ = ["evaluate_pairs", "evaluate_folders", "results_document", "write_json_atomic", "format_summary",
           "compare_inference", "inference_table", "error_entropy_share", "postprocessing_changes", "VARIANTS",
           "DEFAULT_VARIANT", "class_rows"]

# (name, test-time mirroring, post-processing)
VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    ("plain", False, False), ("TTA", True, False), ("post-processing", False, True),
    ("TTA + post-processing", True, True))
DEFAULT_VARIANT = next(n for n, t, p in VARIANTS if (t, p) == (DEFAULT_TTA, DEFAULT_POSTPROCESS))


def _progress(items, progress: bool):
    if not progress:
        return items
    from .progress import progress as tqdm
    return tqdm(items, desc="evaluate", unit="vol", leave=False)


def evaluate_pairs(model: ResUNet3D, preprocessing: Preprocessing, pairs: Sequence[Pair],
                   device: str | torch.device = "cpu", keep_predictions: bool = False,
                   progress: bool = False, tta: bool = DEFAULT_TTA,
                   postprocess: bool = DEFAULT_POSTPROCESS, window: Sequence[int] | None = None) -> list[dict]:
    """Predict each pair's image with ``model`` and score it against its label on the original grid
    (``window``: as :func:`~hipseg_lib.predict.predict_probabilities`).

    Returns one dict per pair: ``id``, ``metrics`` (dice, iou, hd95, asd per class) and, with
    ``keep_predictions``, the ``image``, ``truth`` and ``pred`` arrays.
    """
    results = []
    for pair in _progress(pairs, progress):
        image, truth = load_pair(pair)
        pred = predict_array(model, image.array, image.affine, preprocessing, device,
                             tta=tta, postprocess=postprocess, window=window)
        results.append(_row(pair, image, truth, pred, evaluate_case(pred, truth.array, image.spacing),
                            keep_predictions))
    return results


def _row(pair: Pair, image, truth, pred: np.ndarray, metrics: dict, keep: bool) -> dict:
    row = {"id": str(pair.id), "case": pair.id.case, "metrics": metrics}
    if keep:
        row.update(image=image.array, truth=truth.array, pred=pred, spacing=image.spacing)
    return row


def error_entropy_share(uncertainty: np.ndarray, wrong: np.ndarray, region: np.ndarray,
                        top: float = 0.10) -> tuple[int, int]:
    """Of the wrong voxels in ``region``, how many lie among the ``top`` share of the region's most
    uncertain voxels. Returns ``(wrong voxels there, wrong voxels in the region)``; were errors
    unrelated to uncertainty, the share would be about ``top``.
    """
    u = uncertainty[region].astype(np.float32)
    w = wrong[region]
    if not u.size or not w.any():
        return 0, int(w.sum())
    k = max(1, int(round(top * u.size)))
    most = np.zeros(u.size, bool)
    most[np.argpartition(-u, k - 1)[:k]] = True
    return int((w & most).sum()), int(w.sum())


def compare_inference(model: ResUNet3D, preprocessing: Preprocessing, pairs: Sequence[Pair],
                      device: str | torch.device = "cpu", variants=VARIANTS, progress: bool = False,
                      window: Sequence[int] | None = None) -> dict:
    """Score every inference variant (see :data:`VARIANTS`) on each pair, with seconds per volume.

    The network runs once without and once with mirroring; post-processing reuses those
    probabilities, and its own time is added to theirs. Returns ``{"results": {variant: rows as
    evaluate_pairs with keep_predictions}, "seconds": {variant: [s per volume]}, "entropy": [per
    pair, float16 map of the default variant (else the first)], "entropy_share": (wrong voxels among
    the 10 % most uncertain body voxels, all wrong body voxels) of that variant, pooled over the pairs}``.
    """
    results = {name: [] for name, _, _ in variants}
    seconds = {name: [] for name, _, _ in variants}
    entropies, hits, total = [], 0, 0
    chosen = DEFAULT_VARIANT if DEFAULT_VARIANT in results else variants[0][0]
    chosen_tta = next(t for n, t, _ in variants if n == chosen)
    for pair in _progress(pairs, progress):
        image, truth = load_pair(pair)
        probs, net_time = {}, {}
        for tta in sorted({t for _, t, _ in variants}):
            start = time.perf_counter()
            probs[tta] = predict_probabilities(model, image.array, image.affine, preprocessing, device, tta=tta,
                                               window=window)
            net_time[tta] = time.perf_counter() - start
        scored: list[tuple[np.ndarray, dict]] = []  # a label map equal to an earlier one is not re-scored
        for name, tta, post in variants:
            start = time.perf_counter()
            pred = labels_from_probabilities(probs[tta], post)
            seconds[name].append(net_time[tta] + time.perf_counter() - start)
            metrics = next((m for p, m in scored if np.array_equal(p, pred)), None)
            if metrics is None:
                metrics = evaluate_case(pred, truth.array, image.spacing)
                scored.append((pred, metrics))
            results[name].append(_row(pair, image, truth, pred, metrics, keep=True))
        unc = entropy(probs[chosen_tta])
        pred = results[chosen][-1]["pred"]
        h, n = error_entropy_share(unc, pred != truth.array, (truth.array > 0) | (pred > 0))
        hits, total = hits + h, total + n
        entropies.append(unc.astype(np.float16))
        del probs
    return {"results": results, "seconds": seconds, "entropy": entropies, "entropy_share": (hits, total)}


def inference_table(comparison: dict, metric: str = "dice") -> list[dict]:
    """One row per variant: mean seconds per volume and the mean ``metric`` per class."""
    rows = []
    for name, res in comparison["results"].items():
        values = np.array([r["metrics"][metric] for r in res], dtype=float)
        with np.errstate(all="ignore"):
            means = np.nanmean(values, axis=0)
        rows.append({"inference": name, "s/volume": float(np.mean(comparison["seconds"][name])),
                     **{n: float(m) for n, m in zip(CLASS_NAMES, means)}})
    return rows


def _match_key(path: Path) -> str:
    found = volume_id_in(path.name)
    if found:
        return str(found)
    stem = _stem(path)  # a name with no case and week: match on what is left of it
    for suffix in ("_pred", "_SEMANTIC", "_LFOV", "_seg", "_label"):
        stem = stem.replace(suffix, "")
    return stem


def evaluate_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, progress: bool = False) -> dict:
    """Pair predictions with truths by name (case and week when the names carry them) and score them.

    Returns ``{"cases": [{"id", "metrics": {metric: {class: value}}}], "summary": ...,
    "unmatched": [predictions with no truth], "truths_without_prediction": [...]}``.
    """
    preds = collect_inputs([pred_dir])
    truths = collect_inputs([truth_dir])
    by_key = {}
    for t in truths:
        by_key.setdefault(_match_key(t), t)
    cases, unmatched, per_case = [], [], []  # unmatched: predictions with no truth
    matched = [(p, by_key.get(_match_key(p))) for p in preds]
    if not any(t for _, t in matched):
        raise HipsegError(f"{pred_dir}: no prediction matches a file in {truth_dir} by name")
    it = _progress(matched, progress)
    used = set()
    for p, t in it:
        if t is None:
            unmatched.append(str(p))
            continue
        used.add(t)
        pred = load_volume(p, "label")
        truth = load_volume(t, "label")
        if pred.shape != truth.shape:
            raise HipsegError(f"{p}: shape {pred.shape} differs from its truth {t.name} {truth.shape}")
        m = evaluate_case(pred.array, truth.array, truth.spacing)
        per_case.append(m)
        cases.append({"id": _match_key(p), "prediction": str(p), "truth": str(t),
                      "metrics": _named(m)})
    return {"cases": cases, "summary": summarise(per_case), "unmatched": unmatched,
            "truths_without_prediction": [str(t) for t in truths if t not in used],
            "classes": list(CLASS_NAMES)}


def _named(metrics: dict[str, np.ndarray]) -> dict:
    return {k: {n: (None if np.isnan(v) else float(v)) for n, v in zip(CLASS_NAMES, vals)}
            for k, vals in metrics.items()}


def results_document(results: list[dict], extra: dict | None = None) -> dict:
    """JSON-ready document from :func:`evaluate_pairs` rows: per case and overall."""
    return {"classes": list(CLASS_NAMES),
            "cases": [{"id": r["id"], "metrics": _named(r["metrics"])} for r in results],
            "summary": summarise([r["metrics"] for r in results]), **(extra or {})}


def format_summary(summary: dict, metrics: Sequence[str] = METRICS) -> str:
    """Table of mean (std) per class for each metric."""
    head = f"{'metric':<8}" + "".join(f"{n:>17}" for n in CLASS_NAMES)
    lines = [head, "-" * len(head)]
    for m in metrics:
        if m not in summary:
            continue
        cells = []
        for n in CLASS_NAMES:
            s = summary[m][n]
            cells.append(f"{'n/a':>17}" if s["mean"] is None else f"{s['mean']:>9.3f} ({s['std']:.3f})")
        unit = " mm" if m in ("hd95", "asd") else ""
        lines.append(f"{m + unit:<8}" + "".join(cells))
    return "\n".join(lines)


def class_rows(results: Sequence[dict]) -> list[dict]:
    """One row per class for a table: Dice mean and std, HD95 mean and median, and the number of
    volumes that scored the class (the :func:`~hipseg_lib.metrics.summarise` of ``results``)."""
    summary = summarise([r["metrics"] for r in results])
    return [{"class": n, "Dice mean": summary["dice"][n]["mean"], "Dice std": summary["dice"][n]["std"],
             "HD95 mean (mm)": summary["hd95"][n]["mean"], "HD95 median (mm)": summary["hd95"][n]["median"],
             "volumes": summary["dice"][n]["n"]} for n in CLASS_NAMES]


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
