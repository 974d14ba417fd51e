"""``hipseg evaluate``: predicted label maps against truths, file by file, paired by the case and
week in their names, and the tables the command prints (per volume and per patient)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import CLASS_NAMES, HipsegError
from .evaluate import FOREGROUND_NAMES, named
from .io import load_volume, volume_id_in
from .metrics import METRICS, NSD_TOLERANCE_MM, evaluate_case, per_patient_summary
from .predict import collect_inputs, file_stem

__all__ = ["summarise", "match_key", "evaluate_folders", "format_summary"]


def _progress(items, progress: bool):
    if not progress:
        return items
    from .progress import progress as bar
    return bar(items, desc="evaluate", unit="vol", leave=False)


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
                      "metrics": named(m)})
    return {"cases": cases,
            "per_patient": {m: per_patient_summary(rows, m) for m in ("dice", "hd95", "nsd")},
            "summary": summarise([r["metrics"] for r in rows]), "unmatched": unmatched,
            "truths_without_prediction": [str(t) for t in truths if t not in used],
            "classes": list(CLASS_NAMES)}


def format_summary(summary: dict, metrics: Sequence[str] = METRICS, per_patient: dict | None = None) -> str:
    """Table of the foreground classes: mean (std) over volumes for each metric, then, with
    ``per_patient`` (an evaluation document's), the mean over patients and its 95 % interval."""
    head = f"{'metric':<10}" + "".join(f"{n:>17}" for n in FOREGROUND_NAMES)
    lines = ["per volume: mean (std)", head, "-" * len(head)]
    for m in metrics:
        if m not in summary:
            continue
        cells = []
        for n in FOREGROUND_NAMES:
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
