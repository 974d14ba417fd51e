"""Scoring predictions against truths: a checkpoint on labelled pairs, or two folders of label maps,
reported as the field reports them (foreground classes, per volume and per patient, with bootstrap
intervals over patients: :mod:`~hipseg_lib.metrics`). Choosing the inference options is
:mod:`~hipseg_lib.inference_options`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import CLASS_NAMES, HipsegError
from .io import Pair, load_pair, load_volume, volume_id_in
from .metrics import METRICS, NSD_TOLERANCE_MM, evaluate_case, patient_table, per_patient_summary, summarise
from .predict import collect_inputs, file_stem
from .predictor import Predictor

__all__ = ["evaluate_pairs", "evaluate_folders", "results_document", "format_summary", "class_rows",
           "patient_rows", "each_patient_rows", "is_range", "FOREGROUND"]

FOREGROUND = CLASS_NAMES[1:]  # what summary tables report: the background's Dice says nothing


def _progress(items, progress: bool):
    if not progress:
        return items
    from .progress import progress as tqdm
    return tqdm(items, desc="evaluate", unit="vol", leave=False)


def evaluate_pairs(predictor: Predictor, pairs: Sequence[Pair], keep_predictions: bool = False,
                   progress: bool = False) -> list[dict]:
    """Segment each pair's image with ``predictor`` and score it against its label on the scan's
    own grid.

    Returns one dict per pair: ``id``, ``case``, ``metrics`` (dice, iou, hd95, asd per class) and,
    with ``keep_predictions``, the ``image``, ``truth``, ``pred`` arrays and the ``spacing``.
    """
    results = []
    for pair in _progress(pairs, progress):
        image, truth = load_pair(pair)
        pred = predictor.labels(image.array, image.affine)
        results.append(_row(pair, image, truth, pred, evaluate_case(pred, truth.array, image.spacing),
                            keep_predictions))
    return results


def _row(pair: Pair, image, truth, pred: np.ndarray, metrics: dict, keep: bool) -> dict:
    row = {"id": str(pair.id), "case": pair.id.case, "metrics": metrics}
    if keep:
        row.update(image=image.array, truth=truth.array, pred=pred, spacing=image.spacing)
    return row


def match_key(path: Path) -> str:
    """What pairs a prediction with its truth: the case and week in the name (``B006_Week3``), else
    the name without its ``_pred``/``_SEMANTIC`` ending and extension."""
    found = volume_id_in(path.name)
    if found:
        return str(found)
    stem = file_stem(path)  # a name with no case and week: match on what is left of it
    for suffix in ("_pred", "_SEMANTIC", "_LFOV", "_seg", "_label"):
        stem = stem.replace(suffix, "")
    return stem


def evaluate_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, progress: bool = False) -> dict:
    """Pair predictions with truths by name (case and week when the names carry them) and score them.

    Returns ``{"cases": [{"id", "case", "metrics": {metric: {class: value}}}], "per_patient": {metric:
    {class: mean over patients, its 95 % bootstrap interval, per patient}}, "summary": per-volume
    statistics, "unmatched": [predictions with no truth], "truths_without_prediction": [...]}``. A
    file whose name carries no case counts as a patient of its own.
    """
    preds = collect_inputs([pred_dir])
    truths = collect_inputs([truth_dir])
    by_key: dict[str, Path] = {}
    for t in truths:
        by_key.setdefault(match_key(t), t)
    cases: list[dict] = []
    unmatched: list[str] = []  # predictions with no truth
    rows: list[dict] = []
    matched = [(p, by_key.get(match_key(p))) for p in preds]
    if not any(t for _, t in matched):
        raise HipsegError(f"{pred_dir}: no prediction matches a file in {truth_dir} by name")
    used = set()
    for p, t in _progress(matched, progress):
        if t is None:
            unmatched.append(str(p))
            continue
        used.add(t)
        pred = load_volume(p, "label")
        truth = load_volume(t, "label")
        if pred.shape != truth.shape:
            raise HipsegError(f"{p}: shape {pred.shape} differs from its truth {t.name} {truth.shape}")
        m = evaluate_case(pred.array, truth.array, truth.spacing)
        found = volume_id_in(p.name)
        patient = found.case if found else match_key(p)
        rows.append({"case": patient, "metrics": m})
        cases.append({"id": match_key(p), "case": patient, "prediction": str(p), "truth": str(t),
                      "metrics": _named(m)})
    return {"cases": cases,
            "per_patient": {m: per_patient_summary(rows, m) for m in ("dice", "hd95", "nsd")},
            "summary": summarise([r["metrics"] for r in rows]), "unmatched": unmatched,
            "truths_without_prediction": [str(t) for t in truths if t not in used],
            "classes": list(CLASS_NAMES)}


def _named(metrics: dict[str, np.ndarray]) -> dict:
    return {k: {n: (None if np.isnan(v) else float(v)) for n, v in zip(CLASS_NAMES, vals)}
            for k, vals in metrics.items()}


def results_document(results: list[dict], extra: dict | None = None) -> dict:
    """JSON-ready document from :func:`evaluate_pairs` rows: per volume, per patient with bootstrap
    intervals (Dice, HD95 and NSD, foreground classes), and the per-volume summary."""
    return {"classes": list(CLASS_NAMES),
            "cases": [{"id": r["id"], "case": r["case"], "metrics": _named(r["metrics"])} for r in results],
            "per_patient": {m: per_patient_summary(results, m) for m in ("dice", "hd95", "nsd")
                            if results and m in results[0]["metrics"]},
            "summary": summarise([r["metrics"] for r in results]), **(extra or {})}


def format_summary(summary: dict, metrics: Sequence[str] = METRICS, per_patient: dict | None = None) -> str:
    """Table of the foreground classes: mean (std) over volumes for each metric, then, with
    ``per_patient`` (an evaluation document's), the mean over patients and its 95 % interval."""
    head = f"{'metric':<10}" + "".join(f"{n:>17}" for n in FOREGROUND)
    lines = ["per volume: mean (std)", head, "-" * len(head)]
    for m in metrics:
        if m not in summary:
            continue
        cells = []
        for n in FOREGROUND:
            s = summary[m][n]
            cells.append(f"{'n/a':>17}" if s["mean"] is None else f"{s['mean']:>9.3f} ({s['std']:.3f})")
        unit = {"hd95": " mm", "asd": " mm", "nsd": f" {NSD_TOLERANCE_MM:g}mm"}.get(m, "")
        lines.append(f"{m + unit:<10}" + "".join(cells))
    for m, by_class in (per_patient or {}).items():
        n_patients = len(next(iter(by_class.values()))["patients"])
        lines += ["", f"per patient ({n_patients}): mean [95 % bootstrap interval over patients], {m}"]
        for n, s in by_class.items():
            value = "n/a" if s["mean"] is None else f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
            lines.append(f"  {n:<10} {value}")
    return "\n".join(lines)


def class_rows(results: Sequence[dict]) -> list[dict]:
    """One row per foreground class, over volumes: Dice mean and std, HD95 mean and median, and the
    number of volumes that scored the class (the :func:`~hipseg_lib.metrics.summarise` of ``results``)."""
    summary = summarise([r["metrics"] for r in results])
    return [{"class": n, "Dice mean": summary["dice"][n]["mean"], "Dice std": summary["dice"][n]["std"],
             "HD95 mean (mm)": summary["hd95"][n]["mean"], "HD95 median (mm)": summary["hd95"][n]["median"],
             "volumes": summary["dice"][n]["n"]} for n in FOREGROUND]


def patient_rows(results: Sequence[dict], level: float = 0.95) -> list[dict]:
    """One row per foreground class, over patients (each the mean of its volumes): the mean Dice and
    its bootstrap interval over patients, the same for HD95, and the mean normalised surface
    distance (at :data:`~hipseg_lib.metrics.NSD_TOLERANCE_MM`)."""
    dice, hd = per_patient_summary(results, "dice", level=level), per_patient_summary(results, "hd95", level=level)
    nsd = per_patient_summary(results, "nsd", level=level)
    pct = f"{100 * level:g} %"
    ci = f"range (= {pct} CI)" if is_range(dice) and is_range(hd) else f"{pct} CI"
    return [{"class": n, "Dice": dice[n]["mean"], f"Dice {ci}": _interval(dice[n]),
             "HD95 (mm)": hd[n]["mean"], f"HD95 {ci}": _interval(hd[n], ".1f"),
             f"NSD {NSD_TOLERANCE_MM:g} mm": nsd[n]["mean"]} for n in FOREGROUND]


def is_range(summary: dict) -> bool:
    """Whether every class's interval in a :func:`~hipseg_lib.metrics.per_patient_summary` is just
    the lowest and highest patient's value, as a percentile bootstrap over three patients gives
    (each patient drawn three times has a chance of 1/27, more than a 2.5 % tail)."""
    spans = []
    for s in summary.values():
        values = [v for v in s["patients"].values() if v is not None]
        if s["low"] is None or not values:
            continue
        spans.append(bool(np.isclose(s["low"], min(values)) and np.isclose(s["high"], max(values))))
    return bool(spans) and all(spans)


def each_patient_rows(results: Sequence[dict], metric: str = "dice") -> list[dict]:
    """One row per patient: its number of volumes and the mean of ``metric`` over them, per
    foreground class (:func:`~hipseg_lib.metrics.patient_table`)."""
    cases, table = patient_table(results, metric)
    return [{"patient": case, "volumes": sum(r["case"] == case for r in results),
             **{n: (None if np.isnan(v) else float(v)) for n, v in zip(FOREGROUND, row)}}
            for case, row in zip(cases, table)]


def _interval(s: dict, fmt: str = ".3f") -> str:
    return "n/a" if s["low"] is None else f"{s['low']:{fmt}} - {s['high']:{fmt}}"
