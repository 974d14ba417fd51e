"""Scoring a predictor on labelled scans, on each scan's own grid, and the
tables the field reports: foreground classes, over patients, with intervals
(:mod:`~hipseg_lib.metrics`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import CLASS_NAMES
from .io import Pair, load_pair
from .metrics import evaluate_case, patient_table, per_patient_summary
from .predictor import Predictor

__all__ = ["evaluate_pairs", "named", "results_document", "patient_rows",
           "each_patient_rows", "is_range", "FOREGROUND_NAMES"]

FOREGROUND_NAMES = CLASS_NAMES[1:]  # what tables report: not the background


def evaluate_pairs(predictor: Predictor, pairs: Sequence[Pair],
                   keep: bool = False) -> list[dict]:
    """Segment each pair's image and score it against its label, on the
    scan's own grid. One dict per pair: ``id``, ``case``, ``metrics``
    (:func:`~hipseg_lib.metrics.evaluate_case`) and, with ``keep``, the
    ``image``, ``truth`` and ``pred`` arrays and the ``spacing``."""
    results = []
    for pair in pairs:
        image, truth = load_pair(pair)
        pred = predictor.labels(image.array, image.affine)
        row: dict = {"id": str(pair.id), "case": pair.id.case,
                     "metrics": evaluate_case(pred, truth.array,
                                              image.spacing)}
        if keep:
            row |= {"image": image.array, "truth": truth.array, "pred": pred,
                    "spacing": image.spacing}
        results.append(row)
    return results


def named(metrics: dict[str, np.ndarray]) -> dict:
    """``{metric: {class name: value or None}}``: plain JSON."""
    return {m: {n: None if np.isnan(v) else float(v)
                for n, v in zip(CLASS_NAMES, values)}
            for m, values in metrics.items()}


def results_document(results: list[dict], extra: dict | None = None) -> dict:
    """A JSON document of :func:`evaluate_pairs`'s rows: each volume's
    metrics, and Dice, HD95 and NSD per patient with their intervals."""
    return {"classes": list(CLASS_NAMES),
            "cases": [{"id": r["id"], "case": r["case"],
                       "metrics": named(r["metrics"])} for r in results],
            "per_patient": {m: per_patient_summary(results, m)
                            for m in ("dice", "hd95", "nsd")},
            **(extra or {})}


def is_range(summary: dict) -> bool:
    """Whether every class's interval in a
    :func:`~hipseg_lib.metrics.per_patient_summary` is just the lowest and
    highest patient's value, as a percentile bootstrap over three patients
    gives (each patient drawn every time has a chance of 1/27, more than the
    2.5 % tail)."""
    spans = []
    for s in summary.values():
        values = [v for v in s["patients"].values() if v is not None]
        if s["low"] is not None and values:
            spans.append(bool(np.isclose(s["low"], min(values))
                              and np.isclose(s["high"], max(values))))
    return bool(spans) and all(spans)


def patient_rows(results: Sequence[dict], level: float = 0.95) -> list[dict]:
    """One row per foreground class, over patients: the mean Dice and HD95
    with their bootstrap intervals, and the mean NSD."""
    dice, hd, nsd = (per_patient_summary(results, m, level=level)
                     for m in ("dice", "hd95", "nsd"))
    ci = f"{100 * level:g} % CI"
    if is_range(dice) and is_range(hd):
        ci = f"range (= {ci})"
    return [{"class": n, "Dice": dice[n]["mean"],
             f"Dice {ci}": _interval(dice[n], ".3f"),
             "HD95 (mm)": _interval(hd[n], ".1f", "mean"),
             f"HD95 {ci}": _interval(hd[n], ".1f"),
             "NSD 2 mm": nsd[n]["mean"]} for n in FOREGROUND_NAMES]


def each_patient_rows(results: Sequence[dict], metric: str = "dice"
                      ) -> list[dict]:
    """One row per patient: its volumes and its mean ``metric`` per
    foreground class."""
    cases, table = patient_table(results, metric)
    return [{"patient": case,
             "volumes": sum(r["case"] == case for r in results),
             **{n: None if np.isnan(v) else float(v)
                for n, v in zip(FOREGROUND_NAMES, row)}}
            for case, row in zip(cases, table)]


def _interval(s: dict, fmt: str, which: str = "") -> str:
    if which:
        return "n/a" if s[which] is None else f"{s[which]:{fmt}}"
    if s["low"] is None:
        return "n/a"
    return f"{s['low']:{fmt}} - {s['high']:{fmt}}"
