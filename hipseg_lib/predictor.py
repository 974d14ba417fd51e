"""From a scan to a label map: :class:`Predictor`.

A scan goes through its checkpoint's preprocessing, the network on the whole grid or in
overlapping windows blended with Gaussian weights, optionally its mirrored copies too (test-time
augmentation), back to the scan's own voxels, and to labels (optionally keeping the largest piece
of each single organ). Only one step depends on how the network is run: a *backend* turns images
into class scores (:class:`~hipseg_lib.checkpoint.TorchBackend` for a checkpoint, an ONNX Runtime
one for ``hipseg export``'s files). This module never imports torch.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
from scipy import ndimage

from . import BLADDER, BODY, PROSTATE, RECTUM, SettingsError
from .preprocess import Preprocessing, preprocess_image, reorient, resize_image, voxel_spacing

__all__ = ["InferenceSettings", "Backend", "Predictor", "window_starts", "plan_windows",
           "gaussian_weight", "log_softmax", "keep_largest_component", "labels_from_probabilities",
           "entropy", "SINGLE_ORGANS"]

# The classes that are one connected organ: post-processing keeps the largest piece of each.
SINGLE_ORGANS: tuple[int, ...] = (BLADDER, RECTUM, PROSTATE)


@dataclass(frozen=True)
class InferenceSettings:
    """How a :class:`Predictor` runs its network.

    Args:
        mirror_axes: the axes test-time augmentation mirrors (those training
            mirrored); ``()`` for none.
        postprocess: keep the largest piece of each single organ.
        window: predict in overlapping windows of this size (a network
            trained on patches); None: the whole grid at once.
        overlap: how much neighbouring windows overlap (0.5: by half).
    """

    mirror_axes: tuple[int, ...] = (0,)
    postprocess: bool = True
    window: tuple[int, int, int] | None = None
    overlap: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise SettingsError(f"overlap must be in [0, 1), got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise SettingsError(f"mirror_axes must be among 0, 1, 2, got {self.mirror_axes}")
        object.__setattr__(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))
        if self.window is not None:
            object.__setattr__(self, "window", tuple(int(s) for s in self.window))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mirror_axes": list(self.mirror_axes),
                "window": list(self.window) if self.window else None}

    @classmethod
    def from_dict(cls, d: dict) -> InferenceSettings:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown inference settings: {', '.join(sorted(unknown))}")
        return cls(**d)


class Backend(Protocol):
    """What runs the network: images ``(N, 1, X, Y, Z)`` in, class scores
    ``(N, C, X, Y, Z)`` out, both float32 numpy arrays; every size a multiple
    of ``divisor``."""

    divisor: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Where windows of ``window`` voxels start along an axis of ``size``: as
    few as keep neighbours ``overlap`` apart or closer, spaced evenly, the
    first at 0 and the last flush with the far edge (nnU-Net's rule).

    Example:
        >>> window_starts(10, 4, 0.5)
        [0, 2, 4, 6]
        >>> window_starts(9, 4, 0.5)
        [0, 2, 3, 5]
    """
    if window >= size:
        return [0]
    n = math.ceil((size - window) / (window * (1 - overlap))) + 1
    step = (size - window) / (n - 1)
    return [int(round(k * step)) for k in range(n)]


def plan_windows(shape: Sequence[int], window: Sequence[int],
                 overlap: float = 0.5) -> list[tuple[slice, ...]]:
    """The windows that cover a grid of ``shape``: every combination of the
    starts along each axis (:func:`window_starts`)."""
    window = [min(w, s) for w, s in zip(window, shape)]
    starts = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return [tuple(slice(a, a + w) for a, w in zip(corner, window))
            for corner in itertools.product(*starts)]


def gaussian_weight(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """How much each voxel of a window counts when windows are blended: a
    Gaussian with sigma 1/8 of the window along each axis (nnU-Net's), 1 at
    the centre, small but never zero at the border.

    Example:
        >>> w = gaussian_weight((5, 5, 5))
        >>> float(w[2, 2, 2]), bool(w.min() > 0)
        (1.0, True)
    """
    w = np.ones((1, 1, 1))
    for axis, n in enumerate(window):
        r = np.arange(n) - (n - 1) / 2  # distance from the centre
        g = np.exp(-0.5 * (r / (n * sigma_scale)) ** 2)
        w = w * (g / g.max()).reshape([n if a == axis else 1 for a in range(3)])
    return np.maximum(w, 1e-6).astype(np.float32)


def log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    """Log class probabilities from class scores (stable: the largest score
    is subtracted first)."""
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def keep_largest_component(label: np.ndarray, classes: Sequence[int] = SINGLE_ORGANS,
                           probabilities: np.ndarray | None = None, fill: int = BODY) -> np.ndarray:
    """Keep only the largest connected piece (26-neighbourhood) of each class
    in ``classes`` (when pieces tie for largest, all of them). The voxels of
    the other pieces take their next most probable class when
    ``probabilities`` ``(C, ...)`` are given, else ``fill``.

    Example:
        >>> lab = np.zeros((7, 1, 1), np.uint8); lab[0:3] = 3; lab[5] = 3
        >>> keep_largest_component(lab, (3,), fill=1)[:, 0, 0].tolist()
        [3, 3, 3, 0, 0, 1, 0]
    """
    out = np.array(label, copy=True)
    for c in classes:
        mask = out == c
        pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        if n <= 1:
            continue
        sizes = np.bincount(pieces.ravel())[1:]  # voxels of each piece
        largest = 1 + np.flatnonzero(sizes == sizes.max())
        drop = mask & ~np.isin(pieces, largest)
        if probabilities is None:
            out[drop] = fill
        else:  # the next most probable class
            p = probabilities[:, drop].copy()
            p[c] = -1.0
            out[drop] = p.argmax(0)
    return out


def labels_from_probabilities(probabilities: np.ndarray, postprocess: bool = True) -> np.ndarray:
    """The most probable class of each voxel (uint8); with ``postprocess``,
    each single organ's largest piece only."""
    label = probabilities.argmax(0).astype(np.uint8)
    if postprocess:
        label = keep_largest_component(label, SINGLE_ORGANS, probabilities)
    return label


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Each voxel's entropy of its class probabilities ``(C, ...)``, divided by
    log(C): 0 = certain, 1 = every class equally likely."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(0) / math.log(probabilities.shape[0])


class Predictor:
    """A trained network, the preprocessing its inputs went through in
    training, and how to run it (:class:`InferenceSettings`).

    Example:
        >>> p = load_predictor("model/new_model.pth")          # doctest: +SKIP
        >>> labels = p.labels(volume.array, volume.affine)      # doctest: +SKIP
        >>> plain = p.replace(mirror_axes=(), postprocess=False)  # doctest: +SKIP
    """

    def __init__(self, backend: Backend, preprocessing: Preprocessing,
                 settings: InferenceSettings | None = None):
        self.backend, self.preprocessing = backend, preprocessing
        self.settings = settings or InferenceSettings()

    def replace(self, **changes) -> Predictor:
        """The same network with some settings changed."""
        settings = dataclasses.replace(self.settings, **changes)
        return Predictor(self.backend, self.preprocessing, settings)

    def grid_scores(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``(N, C, X, Y, Z)`` of images ``(N, 1, X, Y, Z)`` on the
        network's grid: at once, or in overlapping windows whose scores are
        blended with Gaussian weights that favour each window's centre."""
        if self.settings.window is None:
            return self.backend(x)
        windows = plan_windows(x.shape[2:], self.settings.window, self.settings.overlap)
        weight = gaussian_weight([s.stop - s.start for s in windows[0]])
        total = np.zeros(x.shape[2:], np.float32)  # the weights' sum per voxel
        out = np.zeros(0, np.float32)
        for w in windows:
            scores = self.backend(np.ascontiguousarray(x[:, :, w[0], w[1], w[2]]))
            if out.size == 0:  # the first window tells how many classes
                out = np.zeros((*scores.shape[:2], *x.shape[2:]), np.float32)
            out[:, :, w[0], w[1], w[2]] += scores * weight
            total[w] += weight
        return out / total

    def grid_log_probabilities(self, x: np.ndarray) -> np.ndarray:
        """Log class probabilities ``(N, C, X, Y, Z)`` on the grid, averaged (as
        probabilities) over the input and its mirrored copies: every subset
        of ``mirror_axes``, each mirrored back before it is averaged."""
        axes = self.settings.mirror_axes
        flips = [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
        total = log_softmax(self.grid_scores(x))  # the input as it is
        for flip in flips:
            dims = tuple(2 + a for a in flip)
            logp = log_softmax(self.grid_scores(np.flip(x, dims).copy()))
            logp = np.flip(logp, dims)  # back to the input's orientation
            total = np.logaddexp(total, logp)  # a sum of probabilities
        return (total - math.log(1 + len(flips))).astype(np.float32)

    def probabilities(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Class probabilities ``(C, *image.shape)`` (float32) in the file's
        own voxel order; outside the body crop, background."""
        prep = self.preprocessing
        turn = reorient(affine, prep.orientation)  # 1. to the training orientation
        arr = turn.apply(np.asarray(image, dtype=np.float32))
        x, where = preprocess_image(arr, prep, turn.spacing(voxel_spacing(affine)),
                                    divisor=self.backend.divisor)  # 2. onto the grid
        logp = self.grid_log_probabilities(x[None, None])[0]  # 3. the network
        logp = where.from_grid(logp)  # 4. the padding off
        # 5. back to the crop's size; resizing log-probabilities, then
        # normalising, is resizing the logits (a softmax ignores a shift)
        logp = resize_image(logp, [b - a for a, b in where.box])
        probs = np.exp(log_softmax(logp, axis=0))
        full = np.zeros((len(probs), *arr.shape), np.float32)
        full[0] = 1.0  # 6. background outside the crop
        full[(slice(None), *(slice(a, b) for a, b in where.box))] = probs
        return np.stack([turn.undo(c) for c in full])  # 7. the file's order

    def labels(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The uint8 label map of one scan, on the scan's own grid."""
        probs = self.probabilities(image, affine)
        return labels_from_probabilities(probs, self.settings.postprocess)
