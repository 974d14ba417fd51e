"""An intensity-only baseline: shows that the data need spatial context to be segmented."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import NUM_CLASSES

__all__ = ["IntensityClassifier", "fit_intensity_classifier"]


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
