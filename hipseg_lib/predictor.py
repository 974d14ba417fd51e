"""One prediction pipeline for every network: :class:`Predictor`.

A scan goes through the checkpoint's preprocessing (orientation, body crop, normalisation, the
grid), the network on the whole grid or in Gaussian-weighted windows, optionally its mirrored copy
too (test-time augmentation), back to the scan's own voxels, and to labels (optionally keeping the
largest piece of each single organ). Only one step depends on how the network is run: a *backend*
turns an array of images into class scores. :func:`hipseg_lib.predict.load_predictor` gives a
PyTorch backend (a checkpoint), :meth:`Predictor.from_export` an ONNX Runtime one (``hipseg
export``); this module itself never imports torch.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from . import DEFAULT_POSTPROCESS, DEFAULT_TTA, SettingsError
from .hostinfo import available_memory
from .io import load_volume
from .portable import (
    OnnxModel,
    check_inputs,
    collect_inputs,
    labels_from_probabilities,
    plan_outputs,
    save_label_map,
    save_probabilities,
)
from .preprocess import Preprocessing, preprocess_image, reorient, resize_image, voxel_spacing

__all__ = ["InferenceSettings", "Backend", "Predictor", "plan_windows", "gaussian_weight", "available_memory",
           "inference_bytes", "MIRROR_AXES"]

# Test-time augmentation mirrors the left-right axis, the one training mirrors (augment.FLIP_AXES).
MIRROR_AXES: tuple[int, ...] = (0,)
# Peak memory of a forward pass, per input voxel and per channel at full resolution: a few
# full-resolution feature maps of float32 (measured on the presets' networks, both backends).
BYTES_PER_VOXEL_AND_CHANNEL = 32


@dataclass(frozen=True)
class InferenceSettings:
    """How a :class:`Predictor` runs its network.

    Args:
        tta: also predict the left-right mirrored scan and average the two (test-time augmentation).
        postprocess: keep the largest piece of each single organ (bladder, rectum, prostate).
        window: run in Gaussian-weighted windows of this size (a network trained on patches); None:
            the whole grid, unless it does not fit in ``memory_bytes``.
        overlap: how much neighbouring windows overlap (0.5: by half a window).
        memory_bytes: what the network may use; None: half of what the device has free.
        precision: ``"auto"`` (bf16 on a GPU that computes it natively, else fp32), ``"bf16"`` or
            ``"fp32"``; the PyTorch backend's (ONNX Runtime computes in fp32).
    """

    tta: bool = DEFAULT_TTA
    postprocess: bool = DEFAULT_POSTPROCESS
    window: tuple[int, int, int] | None = None
    overlap: float = 0.5
    memory_bytes: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise SettingsError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise SettingsError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.window is not None:
            object.__setattr__(self, "window", tuple(int(s) for s in self.window))


class Backend(Protocol):
    """What runs the network: images ``(N, 1, X, Y, Z)`` float32 in, class scores ``(N, C, X, Y, Z)``
    float32 out (numpy); sizes must be multiples of ``divisor``."""

    divisor: int
    base_channels: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def free_bytes(self) -> int: ...


def inference_bytes(shape: Sequence[int], base_channels: int) -> int:
    """Estimated peak memory of one forward pass over a grid of ``shape``."""
    return int(np.prod(shape)) * base_channels * BYTES_PER_VOXEL_AND_CHANNEL


def gaussian_weight(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights for a window (float32): a Gaussian with sigma ``sigma_scale`` times the
    window size per axis (nnU-Net's 1/8), 1 at the centre, small but never zero at the border.

    Example:
        >>> w = gaussian_weight((5, 5, 5))
        >>> float(w[2, 2, 2]), bool(w.min() > 0)
        (1.0, True)
    """
    axes = []
    for p in patch:
        r = np.arange(p, dtype=np.float64) - (p - 1) / 2
        g = np.exp(-0.5 * (r / max(p * sigma_scale, 1e-6)) ** 2)
        axes.append(g / g.max())
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w, 1e-6).astype(np.float32)


def _starts(size: int, patch: int, overlap: float) -> list[int]:
    step = max(1, int(patch * (1 - overlap)))
    pos = list(range(0, max(size - patch, 0) + 1, step))
    if pos[-1] != size - patch:
        pos.append(size - patch)
    return pos


def plan_windows(shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5) -> list[tuple[slice, ...]]:
    """The windows of size ``patch`` that cover a grid of ``shape``, ``overlap`` apart, the last one
    flush with the far edge (a window never sticks out).

    Example:
        >>> [s[0] for s in plan_windows((10, 4, 4), (4, 4, 4))]
        [slice(0, 4, None), slice(2, 6, None), slice(4, 8, None), slice(6, 10, None)]
    """
    patch = [min(p, s) for p, s in zip(patch, shape)]
    return [tuple(slice(i, i + p) for i, p in zip(start, patch))
            for start in itertools.product(*(_starts(s, p, overlap) for s, p in zip(shape, patch)))]


def _log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


class Predictor:
    """A trained network and how to run it: the checkpoint's preprocessing and the
    :class:`InferenceSettings`.

    Args:
        backend: runs the network (:class:`Backend`).
        preprocessing: what the network's inputs went through in training.
        settings: how to run it.

    Example:
        >>> p = load_predictor("model/new_model.pth")              # doctest: +SKIP
        >>> labels = p.labels(volume.array, volume.affine)          # doctest: +SKIP
        >>> plain = p.replace(tta=False, postprocess=False)         # doctest: +SKIP
    """

    def __init__(self, backend: Backend, preprocessing: Preprocessing, settings: InferenceSettings | None = None):
        self.backend, self.preprocessing = backend, preprocessing
        self.settings = settings or InferenceSettings()

    @classmethod
    def from_export(cls, path: str | os.PathLike, settings: InferenceSettings | None = None) -> "Predictor":
        """A network exported by ``hipseg export`` (ONNX, with its JSON beside it), run by ONNX
        Runtime on the CPU; its window (if trained on patches) comes from the JSON."""
        model = OnnxModel(path)
        settings = settings or InferenceSettings()
        if model.window and settings.window is None:
            settings = dataclasses.replace(settings, window=model.window)
        return cls(model, model.preprocessing, settings)

    def replace(self, **changes) -> "Predictor":
        """The same network with some settings changed (e.g. ``tta=False``)."""
        return Predictor(self.backend, self.preprocessing, dataclasses.replace(self.settings, **changes))

    def window(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """The window a grid of ``shape`` is predicted in: the settings' (a network trained on
        patches), else half the grid where the whole would not fit in memory, else None (whole)."""
        if self.settings.window:
            return self.settings.window
        budget = self.settings.memory_bytes
        if budget is None:
            budget = self.backend.free_bytes() // 2
        if inference_bytes(shape, self.backend.base_channels) <= budget:
            return None
        d = self.backend.divisor
        return tuple(max(d, (s // 2) // d * d) for s in shape)

    def grid_scores(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``(N, C, X, Y, Z)`` of images ``(N, 1, X, Y, Z)`` on the network's grid: the
        whole grid at once, or overlapping windows whose scores are averaged with a Gaussian weight
        that favours each window's centre (:func:`gaussian_weight`, :func:`plan_windows`)."""
        patch = self.window(x.shape[2:])
        if not patch:
            return self.backend(x).astype(np.float32, copy=False)
        weight = gaussian_weight([min(p, s) for p, s in zip(patch, x.shape[2:])])
        out: np.ndarray | None = None
        norm = np.zeros(x.shape[2:], np.float32)
        for window in plan_windows(x.shape[2:], patch, self.settings.overlap):
            y = self.backend(np.ascontiguousarray(x[(slice(None), slice(None), *window)]))
            if out is None:
                out = np.zeros((x.shape[0], y.shape[1], *x.shape[2:]), np.float32)
            out[(slice(None), slice(None), *window)] += y * weight
            norm[window] += weight
        assert out is not None  # a grid has at least one window
        return out / norm

    def grid_log_probabilities(self, x: np.ndarray) -> np.ndarray:
        """Log class probabilities ``(N, C, X, Y, Z)`` on the network's grid, averaged (in probability)
        over the mirrored copies when ``tta``."""
        flips = [c for n in range(len(MIRROR_AXES) * self.settings.tta + 1)
                 for c in itertools.combinations(MIRROR_AXES, n)]
        acc: np.ndarray | None = None
        for axes in flips:
            dims = tuple(2 + a for a in axes)
            xi = np.ascontiguousarray(np.flip(x, dims)) if dims else x
            logp = _log_softmax(self.grid_scores(xi))
            if dims:
                logp = np.flip(logp, dims)
            acc = logp if acc is None else np.logaddexp(acc, logp)  # one mirrored copy held at a time
        assert acc is not None
        return np.asarray(acc - math.log(len(flips)), dtype=np.float32)

    def probabilities(self, image: np.ndarray,
                      affine: np.ndarray) -> np.ndarray:
        """Class probabilities ``(C, *image.shape)`` (float32, summing to 1 per
        voxel) in the file's voxel order: outside the body crop, background."""
        prep = self.preprocessing
        turn = reorient(affine, prep.orientation)
        arr = turn.apply(np.asarray(image, dtype=np.float32))
        spacing = turn.spacing(voxel_spacing(affine))
        x, where = preprocess_image(arr, prep, spacing,
                                    divisor=self.backend.divisor)
        logp = self.grid_log_probabilities(x[None, None])[0]
        logp = where.from_grid(logp)
        # Resizing log-probabilities then normalising equals resizing the
        # logits (a per-voxel shift does not change a softmax), so plain
        # inference is unchanged by averaging in probability.
        logp = resize_image(logp, tuple(b - a for a, b in where.box))
        probs = np.exp(_log_softmax(logp, axis=0))
        full = np.zeros((probs.shape[0], *arr.shape), dtype=np.float32)
        full[0] = 1.0  # background outside the crop
        full[(slice(None), *(slice(a, b) for a, b in where.box))] = probs
        return np.stack([turn.undo(c) for c in full])

    def labels(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The uint8 label map of one scan, with the scan's shape and voxel order."""
        return labels_from_probabilities(self.probabilities(image, affine), self.settings.postprocess)

    def predict_files(self, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                      overwrite: bool = False, progress: bool = True, probabilities: bool = False) -> list[Path]:
        """``hipseg predict``: ``<name>_pred.nii.gz`` for every NIfTI file in ``inputs`` (files or
        folders), and with ``probabilities`` ``<name>_probs.nii.gz`` beside it.

        Everything is checked before the first file is written (:func:`~hipseg_lib.portable.plan_outputs`;
        every input is read in full by :func:`~hipseg_lib.portable.check_inputs`: a truncated,
        non-3D, non-finite or constant image stops the run, naming it). Each output is written
        atomically. Returns the label maps written.
        """
        files = collect_inputs(inputs)
        targets, prob_targets = plan_outputs(files, out_dir, overwrite, probabilities)
        check_inputs(files, progress)
        todo = list(zip(files, targets))
        if progress:
            from .progress import progress as tqdm
            todo = tqdm(todo, desc="predict", unit="vol")
        for n, (f, target) in enumerate(todo):
            vol = load_volume(f, "image")
            probs = self.probabilities(vol.array, vol.affine)
            if probabilities:
                save_probabilities(probs, vol.affine, prob_targets[n], overwrite)
            save_label_map(labels_from_probabilities(probs, self.settings.postprocess), vol, target, overwrite)
            del probs
        return targets
