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


def split_leak_experiment(volumes, split_seeds: Sequence[int] = (0, 1, 2, 3, 4), test_fraction: float = 0.1,
                          ) -> list[dict]:
    """How much a volume-level split flatters a model, against the case-level split.

    For each seed: a random split of the *volumes* (weekly scans of one patient can land on both
    sides) and :func:`~hipseg_lib.data.split_by_case` with that seed; the copy-nearest model of
    :func:`nearest_label_dice` is scored on both. One row per seed: Dice and the share of test
    volumes whose copied label came from the same patient.
    """
    volumes = list(volumes)
    loaded = [v.load() for v in volumes]
    x = np.stack([np.asarray(image, np.float32).ravel() for image, _ in loaded])
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    labels = [np.asarray(label) for _, label in loaded]
    case = np.array([v.id.case for v in volumes])
    index = {str(v.id): n for n, v in enumerate(volumes)}
    rows = []
    for seed in split_seeds:
        perm = np.random.default_rng(seed).permutation(len(volumes))
        n_test = max(1, int(len(volumes) * test_fraction))
        row: dict[str, float] = {"repeat": seed}
        by_case = split_by_case([v.pair for v in volumes], seed=seed)
        splits = {"volume split": (perm[n_test:], perm[:n_test]),
                  "case split": tuple(np.array([index[str(p.id)] for p in by_case[k]]) for k in ("train", "test"))}
        for name, (tr, te) in splits.items():
            dice, copied = nearest_label_dice(x, labels, tr, te)
            row[f"{name}: Dice"] = dice
            row[f"{name}: same patient"] = float(np.mean(case[copied] == case[te]))
        rows.append(row)
    return rows
