"""Segmenting scans with a trained checkpoint.

:func:`predict_array` applies the checkpoint's own preprocessing (orientation, intensity
normalisation, resize), runs the network on the whole volume or in Gaussian-weighted sliding
windows (when the network was trained on patches, or the whole volume would not fit in memory),
optionally averages over mirrored copies of the input (test-time augmentation), resizes the class
probabilities back to the input grid, takes the arg-max and optionally keeps only the largest
connected piece of each single-organ class. The result has the input's shape and voxel order.

Scoring predictions against truths lives in :mod:`hipseg_lib.evaluate`.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import DEFAULT_POSTPROCESS, DEFAULT_TTA, NUM_CLASSES
from .augment import FLIP_AXES
from .checkpoint import load_model
from .model import ResUNet3D
from .portable import (SINGLE_ORGANS, collect_inputs, entropy, gaussian_weight_array, keep_largest_component,
                       labels_from_probabilities, prediction_name, probabilities_name, window_starts,
                       write_predictions)
from .preprocess import Preprocessing, preprocess_image, reorient, voxel_spacing
from .runtime import available_bytes

__all__ = ["predict_array", "predict_probabilities", "labels_from_probabilities", "sliding_window_logits",
           "gaussian_weight", "keep_largest_component", "entropy", "collect_inputs", "prediction_name",
           "probabilities_name", "predict_files", "SINGLE_ORGANS", "DEFAULT_TTA", "DEFAULT_POSTPROCESS"]

def _inference_bytes(model: ResUNet3D, shape: Sequence[int]) -> int:
    # Peak inference memory is dominated by a few full-resolution feature maps.
    return int(np.prod(shape)) * model.config.base_channels * 4 * 8


def gaussian_weight(patch: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Blending weights for a window: a Gaussian with sigma ``sigma_scale`` times the window size
    per axis (nnU-Net's 1/8), 1 at the centre, small but never zero at the border.

    Example:
        >>> w = gaussian_weight((5, 5, 5))
        >>> float(w[2, 2, 2]), bool(w.min() > 0)
        (1.0, True)
    """
    return torch.from_numpy(gaussian_weight_array(patch, sigma_scale))


def sliding_window_logits(model: torch.nn.Module, x: torch.Tensor, patch: Sequence[int], overlap: float = 0.5,
                          blend: str = "gaussian") -> torch.Tensor:
    """Class scores of ``x`` (N, C_in, X, Y, Z) from overlapping windows of size ``patch``.

    Where windows overlap, their scores are averaged with a Gaussian weight (``blend="gaussian"``:
    a window's centre, which saw the most context, counts more than its border) or equally
    (``"constant"``). Only one window's output is held at a time besides the running sums.
    """
    size = x.shape[2:]
    patch = [min(p, s) for p, s in zip(patch, size)]
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', not {blend!r}")
    w = gaussian_weight(patch) if blend == "gaussian" else torch.ones(patch)
    w = w.to(x.device)
    out = norm = None
    starts = [window_starts(s, p, overlap) for s, p in zip(size, patch)]
    for i, j, k in itertools.product(*starts):
        sl = (slice(None), slice(None), slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
        y = model(x[sl]).float()
        if out is None:
            out = torch.zeros((x.shape[0], y.shape[1], *size), dtype=torch.float32, device=x.device)
            norm = torch.zeros(size, dtype=torch.float32, device=x.device)
        out[sl] += y * w
        norm[sl[2:]] += w
    return out / norm


def _flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    return [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]


def _network_log_probabilities(model, xt: torch.Tensor, budget: int, tta_axes: Sequence[int],
                                window: Sequence[int] | None = None) -> torch.Tensor:
    """log of the class probabilities on the network grid, averaged over the mirrored copies."""
    patch = window  # a network trained on patches sees patches
    if not patch and _inference_bytes(model, xt.shape[2:]) > budget:
        div = model.divisor
        patch = [max(div, (s // 2) // div * div) for s in xt.shape[2:]]

    def forward(x):
        return sliding_window_logits(model, x, patch) if patch else model(x).float()

    acc, n = None, 0
    for flips in _flip_sets(tta_axes):
        dims = [2 + a for a in flips]
        logp = torch.log_softmax(forward(torch.flip(xt, dims) if dims else xt), 1)
        if dims:
            logp = torch.flip(logp, dims)
        acc = logp if acc is None else torch.logaddexp(acc, logp)  # streams: one copy at a time
        n += 1
    return acc - math.log(n)


@torch.no_grad()
def predict_probabilities(model: ResUNet3D, image: np.ndarray, affine: np.ndarray, preprocessing: Preprocessing,
                          device: str | torch.device = "cpu", memory_bytes: int | None = None,
                          tta: bool = DEFAULT_TTA, window: Sequence[int] | None = None) -> np.ndarray:
    """Class probabilities ``(C, *image.shape)`` (float32, summing to 1 per voxel) in the file's voxel order.

    Args:
        model: a network in eval mode.
        image: 3D intensities in the file's voxel order.
        affine: the file's affine (its orientation is undone at the end).
        preprocessing: the checkpoint's preprocessing.
        device: where to run.
        memory_bytes: memory the network may use (default: half of what is free); when the whole
            volume needs more, Gaussian-weighted sliding windows of half the size are used.
        tta: also run the left-right mirrored input (the flip the training augmentation used) and
            average the two softmax outputs.
        window: the patch a network trained on patches was trained on (:class:`LoadedModel`'s
            ``window``): it then always runs in Gaussian-weighted windows of that size.
    """
    device = torch.device(device)
    turn = reorient(affine, preprocessing.orientation)
    arr = turn.apply(np.asarray(image, dtype=np.float32))
    x, where = preprocess_image(arr, preprocessing, turn.spacing(voxel_spacing(affine)), divisor=model.divisor)
    xt = torch.from_numpy(x)[None, None].to(device)
    budget = memory_bytes if memory_bytes is not None else available_bytes(device) // 2
    logp = _network_log_probabilities(model, xt, budget, FLIP_AXES if tta else (), window)
    # Resizing log-probabilities then normalising equals resizing the logits (a per-voxel shift
    # does not change a softmax), so plain inference is unchanged by averaging in probability.
    box = where.box
    crop_shape = tuple(b - a for a, b in box)
    logp = F.interpolate(where.from_grid(logp), size=crop_shape, mode="trilinear", align_corners=False)
    probs = torch.softmax(logp, 1)[0].cpu().numpy()
    del logp
    full = np.zeros((probs.shape[0], *arr.shape), dtype=np.float32)
    full[0] = 1.0  # outside the body crop: background
    full[(slice(None), *(slice(a, b) for a, b in box))] = probs
    del probs
    return np.stack([turn.undo(c) for c in full])


def predict_array(model: ResUNet3D, image: np.ndarray, affine: np.ndarray, preprocessing: Preprocessing,
                  device: str | torch.device = "cpu", memory_bytes: int | None = None,
                  tta: bool = DEFAULT_TTA, postprocess: bool = DEFAULT_POSTPROCESS,
                  return_probabilities: bool = False, window: Sequence[int] | None = None):
    """Segment one image array; the result is a uint8 label map with ``image``'s shape.

    Arguments as :func:`predict_probabilities`; ``postprocess`` keeps the largest piece of each
    single-organ class (:data:`SINGLE_ORGANS`). With ``return_probabilities``, returns
    ``(label, probabilities)``.
    """
    probs = predict_probabilities(model, image, affine, preprocessing, device, memory_bytes, tta, window)
    label = labels_from_probabilities(probs, postprocess)
    return (label, probs) if return_probabilities else label


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  device: str = "auto", overwrite: bool = False, progress: bool = True, tta: bool = DEFAULT_TTA,
                  postprocess: bool = DEFAULT_POSTPROCESS, probabilities: bool = False) -> list[Path]:
    """Segment NIfTI files with a checkpoint; write ``<name>_pred.nii.gz`` label maps to ``out_dir``,
    and with ``probabilities`` also ``<name>_probs.nii.gz``: the per-class probabilities as a 4D
    image (x, y, z, class) on the input's grid.

    The checkpoint is loaded first; then :func:`~hipseg_lib.portable.write_predictions` checks
    every input and the outputs before the first file is written, and writes each atomically.
    Returns the label maps written.
    """
    from .runtime import resolve_device

    files = collect_inputs(inputs)
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev, expect_classes=NUM_CLASSES)

    def probabilities_of(v):
        return predict_probabilities(loaded.network, v.array, v.affine, loaded.preprocessing, dev, tta=tta,
                                     window=loaded.window)

    return write_predictions(files, out_dir, probabilities_of, overwrite, progress, postprocess, probabilities)
