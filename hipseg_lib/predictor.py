"""From a scan to a label map: :class:`Predictor`.

A scan goes through its checkpoint's preprocessing, the network on the whole
grid or in overlapping windows blended with Gaussian weights, optionally its
mirrored copies too (test-time augmentation), back to the scan's own voxels,
and to labels (optionally only the largest piece of each single organ). One
step depends on how the network runs: a *backend* turns images into class
scores (:class:`~hipseg_lib.checkpoint.TorchBackend` for a checkpoint, ONNX
Runtime for ``hipseg export``'s files). The network's grid is computed on
numpy arrays, or on a backend's own arrays (torch tensors, which stay on
their device: a GPU validates without copying scores back). This module never
imports torch.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from . import BLADDER, BODY, PROSTATE, RECTUM, SettingsError
from .preprocess import Preprocessing, preprocess_image, reorient, resize_image

__all__ = ["InferenceSettings", "Backend", "ArrayOps", "NUMPY_OPS", "Predictor",
           "window_starts",
           "plan_windows", "gaussian_weight", "log_softmax",
           "keep_largest_component", "labels_from_probabilities", "entropy",
           "SINGLE_ORGANS"]

# The classes that are one connected organ (bones and body are not)
SINGLE_ORGANS: tuple[int, ...] = (BLADDER, RECTUM, PROSTATE)


@dataclass(frozen=True)
class InferenceSettings:
    """How a :class:`Predictor` runs its network.

    Args:
        mirror_axes: the axes test-time augmentation mirrors (those the
            training mirrored, as a checkpoint stores them); ``()``, the
            default: none.
        postprocess: keep the largest piece of each single organ.
        window: predict in overlapping windows of this size (a network
            trained on patches); None: the whole grid at once.
        overlap: how much neighbouring windows overlap (0.5: by half).
    """

    mirror_axes: tuple[int, ...] = ()
    postprocess: bool = True
    window: tuple[int, ...] | None = None
    overlap: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise SettingsError(f"overlap must be in [0, 1), "
                                f"got {self.overlap}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise SettingsError(f"mirror_axes must be among 0, 1, 2, "
                                f"got {self.mirror_axes}")
        object.__setattr__(self, "mirror_axes", tuple(self.mirror_axes))
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))

    def to_dict(self) -> dict:
        return {"mirror_axes": list(self.mirror_axes),
                "postprocess": self.postprocess, "overlap": self.overlap,
                "window": list(self.window) if self.window else None}

    @classmethod
    def from_dict(cls, d: dict) -> InferenceSettings:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"unknown inference settings: "
                                f"{', '.join(sorted(unknown))}")
        return cls(**d)


class Backend(Protocol):
    """What runs the network: images ``(N, 1, X, Y, Z)`` in, class scores
    ``(N, C, X, Y, Z)`` out, both float32 numpy arrays (or, for a backend
    whose ``ops`` are its own arrays' functions, arrays of that kind)."""

    def __call__(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class ArrayOps:
    """The few array functions a :class:`Predictor` needs that numpy and
    torch name differently: :data:`NUMPY_OPS`, or a backend's ``ops`` for
    its own arrays (``checkpoint.TORCH_OPS`` for tensors)."""

    zeros: Callable       # zeros(shape, like): float32, beside ``like``
    put: Callable         # put(numpy_array, like): it, beside ``like``
    contiguous: Callable  # the array laid out in order (a copy if needed)
    flip: Callable        # flip(a, dims): a mirrored copy
    logaddexp: Callable   # log(exp(a) + exp(b)), elementwise
    log_softmax: Callable  # log_softmax(z, axis)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Where windows of ``window`` voxels start along an axis of ``size``:
    as few as overlap their neighbours by at least ``overlap`` of a window,
    spaced evenly, the first at 0 and the last flush with the far edge
    (nnU-Net's rule).

    Example:
        >>> window_starts(10, 4, 0.5)
        [0, 2, 4, 6]
    """
    if window >= size:
        return [0]
    n = math.ceil((size - window) / (window * (1 - overlap))) + 1
    step = (size - window) / (n - 1)
    return [round(k * step) for k in range(n)]


def plan_windows(shape: Sequence[int], window: Sequence[int],
                 overlap: float = 0.5) -> list[tuple[slice, ...]]:
    """The windows that cover a grid of ``shape``: every combination of
    the starts along each axis (:func:`window_starts`)."""
    window = [min(w, s) for w, s in zip(window, shape)]
    starts = [window_starts(s, w, overlap) for s, w in zip(shape, window)]
    return [tuple(slice(a, a + w) for a, w in zip(corner, window))
            for corner in itertools.product(*starts)]


def gaussian_weight(window: Sequence[int], sigma_scale=0.125) -> np.ndarray:
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
    """Log class probabilities from class scores (the largest score taken
    off first, so that no exponential overflows)."""
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


NUMPY_OPS = ArrayOps(zeros=lambda shape, like: np.zeros(shape, np.float32),
                     put=lambda a, like: a,
                     contiguous=np.ascontiguousarray,
                     flip=lambda a, dims: np.flip(a, dims).copy(),
                     logaddexp=np.logaddexp, log_softmax=log_softmax)


def keep_largest_component(label: np.ndarray, classes=SINGLE_ORGANS,
                           probabilities: np.ndarray | None = None,
                           fill: int = BODY) -> np.ndarray:
    """Keep only the largest connected piece (26-neighbourhood) of each class
    in ``classes`` (pieces that tie for largest all stay). The voxels of the
    other pieces take their next most probable class when ``probabilities``
    ``(C, ...)`` are given, else ``fill``.

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


def labels_from_probabilities(probabilities: np.ndarray,
                              postprocess: bool = True) -> np.ndarray:
    """Each voxel's most probable class (uint8); with ``postprocess``, each
    single organ's largest piece only."""
    label = probabilities.argmax(0).astype(np.uint8)
    if postprocess:
        label = keep_largest_component(label, SINGLE_ORGANS, probabilities)
    return label


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Each voxel's entropy of its class probabilities ``(C, ...)``, divided
    by log(C): 0 = certain, 1 = every class equally likely."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(0) / math.log(probabilities.shape[0])


class Predictor:
    """A trained network (its backend), the preprocessing its inputs had in
    training, and how to run it (:class:`InferenceSettings`).

    Example:
        >>> p = load_predictor("model/new_model.pth")      # doctest: +SKIP
        >>> labels = p.labels(volume.array, volume.affine)  # doctest: +SKIP
    """

    def __init__(self, backend: Backend, preprocessing: Preprocessing,
                 settings: InferenceSettings | None = None):
        self.backend, self.preprocessing = backend, preprocessing
        self.settings = settings or InferenceSettings()

    def replace(self, **changes) -> Predictor:
        """The same network with some settings changed."""
        settings = dataclasses.replace(self.settings, **changes)
        return Predictor(self.backend, self.preprocessing, settings)

    def ops(self, x) -> ArrayOps:
        """The array functions for ``x``: numpy's for a numpy array, else
        the backend's, which computes on arrays of that kind."""
        if isinstance(x, np.ndarray):
            return NUMPY_OPS
        ops = getattr(self.backend, "ops", None)
        if ops is None:
            raise TypeError(f"this backend computes on numpy arrays, not "
                            f"{type(x).__name__}")
        return ops

    def grid_scores(self, x):
        """Class scores ``(N, C, X, Y, Z)`` of images ``(N, 1, X, Y, Z)``: at
        once, or in overlapping windows blended with Gaussian weights."""
        if self.settings.window is None:
            return self.backend(x)
        xp = self.ops(x)
        windows = plan_windows(x.shape[2:], self.settings.window,
                               self.settings.overlap)
        weight = xp.put(gaussian_weight([s.stop - s.start
                                         for s in windows[0]]), x)
        total = xp.zeros(x.shape[2:], x)  # the weights per voxel
        out = None
        for w in windows:
            scores = self.backend(xp.contiguous(x[:, :, w[0], w[1], w[2]]))
            if out is None:  # the first window tells how many classes
                out = xp.zeros((*scores.shape[:2], *x.shape[2:]), x)
            out[:, :, w[0], w[1], w[2]] += scores * weight
            total[w] += weight
        return out / total

    def grid_log_probabilities(self, x):
        """Log class probabilities ``(N, C, X, Y, Z)``, averaged (as
        probabilities) over the input and its mirrored copies: every subset
        of ``mirror_axes``, each mirrored back first."""
        xp, axes = self.ops(x), self.settings.mirror_axes
        flips = [c for n in range(1, len(axes) + 1)
                 for c in itertools.combinations(axes, n)]
        total = xp.log_softmax(self.grid_scores(x), 1)  # the input as it is
        for flip in flips:
            dims = tuple(2 + a for a in flip)
            logp = xp.log_softmax(self.grid_scores(xp.flip(x, dims)), 1)
            logp = xp.flip(logp, dims)  # back to the input's orientation
            total = xp.logaddexp(total, logp)  # a sum of probabilities
        return total - math.log(1 + len(flips))

    def probabilities(self, image: np.ndarray,
                      affine: np.ndarray) -> np.ndarray:
        """Class probabilities ``(C, *image.shape)`` (float32) in the file's
        own voxel order; outside the body crop, background."""
        turn = reorient(affine, self.preprocessing.orientation)
        arr = turn.apply(np.asarray(image, dtype=np.float32))  # 1. to LPS
        x, box = preprocess_image(arr, self.preprocessing)     # 2. the grid
        logp = self.grid_log_probabilities(x[None, None])[0]   # 3. network
        # 4. back to the crop's size: resizing log-probabilities, then
        # normalising, equals resizing the scores (a softmax ignores shifts)
        logp = resize_image(logp, [b - a for a, b in box])
        probs = np.exp(log_softmax(logp, axis=0))
        full = np.zeros((len(probs), *arr.shape), np.float32)
        full[0] = 1.0  # 5. background outside the crop
        full[:, box[0][0]:box[0][1], box[1][0]:box[1][1],
             box[2][0]:box[2][1]] = probs
        return np.stack([turn.undo(c) for c in full])  # 6. the file's order

    def labels(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The uint8 label map of one scan, on the scan's own grid."""
        probs = self.probabilities(image, affine)
        return labels_from_probabilities(probs, self.settings.postprocess)
