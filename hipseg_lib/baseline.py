"""Two experiments without a network: an intensity-only classifier (the data
need spatial context) and a copy-the-nearest-label model (letting a test
patient's other weeks into training flatters a model)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import NUM_CLASSES
from .data import split_by_case
from .metrics import dice_per_class

__all__ = ["IntensityClassifier", "fit_intensity_classifier",
           "intensity_baseline_dice", "nearest_label_dice",
           "split_leak_experiment"]


@dataclass
class IntensityClassifier:
    """Each voxel's class from its intensity alone: a class per histogram
    bin."""

    edges: np.ndarray
    table: np.ndarray  # the class of each bin

    def predict(self, image: np.ndarray) -> np.ndarray:
        bins = np.digitize(image, self.edges) - 1
        return self.table[np.clip(bins, 0, len(self.table) - 1)]


def fit_intensity_classifier(pairs, bins: int = 128, balanced: bool = False
                             ) -> IntensityClassifier:
    """An :class:`IntensityClassifier` fitted on (normalised image, label)
    pairs: each bin takes its most frequent class, or with ``balanced`` the
    class whose own histogram is highest there (as if every class were
    equally common: the small ones' best chance)."""
    pairs = list(pairs)
    lo = min(float(image.min()) for image, _ in pairs)
    hi = max(float(image.max()) for image, _ in pairs)
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros((bins, NUM_CLASSES))  # voxels per (bin, class)
    for image, label in pairs:
        b = np.clip(np.digitize(image, edges) - 1, 0, bins - 1)
        np.add.at(counts, (b.ravel(), label.ravel().astype(int)), 1)
    if balanced:
        counts = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    return IntensityClassifier(edges, counts.argmax(1).astype(np.uint8))


def intensity_baseline_dice(train_volumes, test_volumes,
                            balanced: bool = False) -> np.ndarray:
    """Fit :func:`fit_intensity_classifier` on the (cached) training volumes
    and return its mean Dice per class on the test volumes."""
    clf = fit_intensity_classifier((v.load() for v in train_volumes),
                                   balanced=balanced)
    scores = [dice_per_class(clf.predict(image), label)
              for image, label in (v.load() for v in test_volumes)]
    return np.nanmean(scores, axis=0)


def nearest_label_dice(images: np.ndarray, labels: list, pool, test
                       ) -> tuple[float, list[int]]:
    """The copy-the-nearest-label "model": each test volume takes the label
    map of the volume in ``pool`` whose image correlates best with its own.

    Args:
        images: one flattened, z-scored image per row.
        labels: the label maps, in the same order.

    Returns:
        The mean foreground Dice over ``test``, and which volume each copied.
    """
    pool, test = np.asarray(pool), np.asarray(test)
    similarity = images[test] @ images[pool].T
    copied = [int(pool[j]) for j in similarity.argmax(axis=1)]
    dice = [np.nanmean(dice_per_class(labels[j], labels[i])[1:])
            for i, j in zip(test, copied)]
    return float(np.mean(dice)), copied


def split_leak_experiment(volumes, split_seeds: Sequence[int] = range(5)
                          ) -> list[dict]:
    """How much letting a test patient's other weeks into the training pool
    flatters a model: for each seed, every test volume of
    :func:`~hipseg_lib.data.split_by_case` is scored by
    :func:`nearest_label_dice` twice, copying from the training patients'
    volumes (a split by patient), and from those plus its own patient's
    other weeks (what a split by scan lets in). Only the pool differs."""
    volumes = list(volumes)
    loaded = [v.load() for v in volumes]
    x = np.stack([image.ravel() for image, _ in loaded]).astype(np.float32)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    labels = [label for _, label in loaded]
    case = np.array([v.id.case for v in volumes])
    rows = []
    for seed in split_seeds:
        split = split_by_case(volumes, seed=seed)
        train = [volumes.index(v) for v in split["train"]]
        alone, leaked, own = [], [], []
        for t in (volumes.index(v) for v in split["test"]):
            weeks = [i for i in np.flatnonzero(case == case[t]) if i != t]
            alone.append(nearest_label_dice(x, labels, train, [t])[0])
            dice, copied = nearest_label_dice(x, labels, train + weeks, [t])
            leaked.append(dice)
            own.append(case[copied[0]] == case[t])
        rows.append({"seed": seed, "test volumes": len(alone),
                     "split by patient": float(np.mean(alone)),
                     "other weeks in the pool": float(np.mean(leaked)),
                     "copied its own patient": float(np.mean(own))})
    return rows
