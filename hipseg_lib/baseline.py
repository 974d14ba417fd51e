"""Two experiments without a network, shown in the book: an intensity-only classifier (the data
need spatial context) and a copy-the-nearest-label model (a volume-level split leaks patients)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from . import NUM_CLASSES
from .data import split_by_case
from .metrics import dice_per_class

__all__ = ["IntensityClassifier", "fit_intensity_classifier", "intensity_baseline_dice", "nearest_label_dice",
           "split_leak_experiment"]


@dataclass
class IntensityClassifier:
    """Per-voxel maximum-a-posteriori class from a class-conditional intensity histogram."""

    edges: np.ndarray
    table: np.ndarray  # best class per histogram bin

    def predict(self, image: np.ndarray) -> np.ndarray:
        bins = np.clip(np.digitize(image, self.edges) - 1, 0, len(self.edges) - 2)
        return self.table[bins].astype(np.uint8)


def fit_intensity_classifier(pairs: Iterable[tuple[np.ndarray, np.ndarray]], bins: int = 128,
                             num_classes: int = NUM_CLASSES, balanced: bool = False) -> IntensityClassifier:
    """Fit on (normalised image, label) pairs a classifier that sees one voxel's intensity only.

    Args:
        balanced: False: each bin takes its most frequent class (maximum a posteriori: the most
            accurate such classifier, which never picks a rare class). True: each bin takes the
            class whose own intensity histogram is highest there (maximum likelihood, as if all
            classes were equally common), which gives the small classes their best chance.
    """
    pairs = list(pairs)
    lo = min(float(np.min(i)) for i, _ in pairs)
    hi = max(float(np.max(i)) for i, _ in pairs)
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros((bins, num_classes))
    for image, label in pairs:
        b = np.clip(np.digitize(np.asarray(image), edges) - 1, 0, bins - 1)
        np.add.at(counts, (b.ravel(), np.asarray(label).ravel().astype(int)), 1)
    if balanced:
        counts = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    return IntensityClassifier(edges, counts.argmax(1))


def intensity_baseline_dice(train_volumes, test_volumes, balanced: bool = False) -> np.ndarray:
    """Fit :func:`fit_intensity_classifier` on ``train_volumes`` and return the mean per-class test
    Dice (NaN-aware). The volumes are :class:`~hipseg_lib.data.CachedVolume` (preprocessed)."""
    clf = fit_intensity_classifier((v.load() for v in train_volumes), balanced=balanced)
    return np.nanmean([dice_per_class(clf.predict(np.asarray(image)), np.asarray(label))
                       for image, label in (v.load() for v in test_volumes)], axis=0)


def nearest_label_dice(images: np.ndarray, labels: list, train_idx, test_idx) -> tuple[float, list[int]]:
    """The copy-the-nearest-training-label "model": each test volume takes the label map of the
    training volume whose image correlates best with its own.

    Args:
        images: one flattened, z-scored image per row.
        labels: the label maps, in the same order.

    Returns:
        (mean foreground Dice over the test volumes, the training index each one copied).
    """
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    sim = images[test_idx] @ images[train_idx].T
    copied = [int(train_idx[int(np.argmax(row))]) for row in sim]
    scores = [np.nanmean(dice_per_class(labels[j], labels[i])[1:]) for i, j in zip(test_idx, copied)]
    return float(np.mean(scores)), copied


def split_leak_experiment(volumes, split_seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> list[dict]:
    """How much letting a test patient's other weeks into the training pool flatters a model.

    For each seed, the test patients of :func:`~hipseg_lib.data.split_by_case`; every test volume
    is scored twice by the copy-nearest model of :func:`nearest_label_dice`: copying from the
    training patients' volumes (a split by patient), and from the same pool plus its own patient's
    other weeks (what a split by scan lets in). Only the pool differs; the test volumes are the
    same. One row per seed: both Dice, and the share of test volumes that copied their own patient.
    """
    volumes = list(volumes)
    loaded = [v.load() for v in volumes]
    x = np.stack([np.asarray(image, np.float32).ravel() for image, _ in loaded])
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    labels = [np.asarray(label) for _, label in loaded]
    case = np.array([v.id.case for v in volumes])
    rows = []
    for seed in split_seeds:
        split = split_by_case(volumes, seed=seed)
        train = [volumes.index(v) for v in split["train"]]
        test = [volumes.index(v) for v in split["test"]]
        by_patient, by_scan, same = [], [], []
        for t in test:
            siblings = [i for i in range(len(volumes)) if case[i] == case[t] and i != t]
            by_patient.append(nearest_label_dice(x, labels, train, [t])[0])
            dice, copied = nearest_label_dice(x, labels, train + siblings, [t])
            by_scan.append(dice)
            same.append(case[copied[0]] == case[t])
        rows.append({"repeat": seed, "test volumes": len(test), "split by patient: Dice": float(np.mean(by_patient)),
                     "siblings in the pool: Dice": float(np.mean(by_scan)),
                     "copied its own patient": float(np.mean(same))})
    return rows
