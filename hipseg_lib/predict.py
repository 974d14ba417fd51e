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
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import (BLADDER, BODY, CLASS_NAMES, DEFAULT_POSTPROCESS, DEFAULT_TTA, NUM_CLASSES, PROSTATE, RECTUM,
               HipsegError)
from .augment import FLIP_AXES
from .checkpoint import load_model
from .io import constant_image_problem, is_nifti, load_volume, save_nifti_atomic
from .model import ResUNet3D
from .preprocess import Preprocessing, preprocess_image, reorient
from .runtime import available_bytes

__all__ = ["predict_array", "predict_probabilities", "labels_from_probabilities", "sliding_window_logits",
           "gaussian_weight", "keep_largest_component", "entropy", "collect_inputs", "prediction_name",
           "probabilities_name", "predict_files", "SINGLE_ORGANS", "DEFAULT_TTA", "DEFAULT_POSTPROCESS"]

# Classes that are one connected organ: post-processing keeps the largest piece of each.
# Bones (pelvis and both femora) and the body are left alone.
SINGLE_ORGANS: tuple[int, ...] = (BLADDER, RECTUM, PROSTATE)


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
    axes = []
    for p in patch:
        r = torch.arange(p, dtype=torch.float64) - (p - 1) / 2
        g = torch.exp(-0.5 * (r / max(p * sigma_scale, 1e-6)) ** 2)
        axes.append(g / g.max())
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return w.clamp_min(1e-6).float()


def _window_starts(size: int, patch: int, overlap: float) -> list[int]:
    step = max(1, int(patch * (1 - overlap)))
    pos = list(range(0, max(size - patch, 0) + 1, step))
    if pos[-1] != size - patch:
        pos.append(size - patch)
    return pos


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
    starts = [_window_starts(s, p, overlap) for s, p in zip(size, patch)]
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


def _network_log_probabilities(model, xt: torch.Tensor, budget: int, tta_axes: Sequence[int]) -> torch.Tensor:
    """log of the class probabilities on the network grid, averaged over the mirrored copies."""
    patch = getattr(model, "inference_patch", None)  # a network trained on patches sees patches
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
                          tta: bool = DEFAULT_TTA) -> np.ndarray:
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
    """
    device = torch.device(device)
    turn = reorient(affine, preprocessing.orientation)
    arr = turn.apply(np.asarray(image, dtype=np.float32))
    x, box = preprocess_image(arr, preprocessing)
    xt = torch.from_numpy(x)[None, None].to(device)
    budget = memory_bytes if memory_bytes is not None else available_bytes(device) // 2
    logp = _network_log_probabilities(model, xt, budget, FLIP_AXES if tta else ())
    # Resizing log-probabilities then normalising equals resizing the logits (a per-voxel shift
    # does not change a softmax), so plain inference is unchanged by averaging in probability.
    crop_shape = tuple(b - a for a, b in box)
    logp = F.interpolate(logp, size=crop_shape, mode="trilinear", align_corners=False)
    probs = torch.softmax(logp, 1)[0].cpu().numpy()
    del logp
    full = np.zeros((probs.shape[0], *arr.shape), dtype=np.float32)
    full[0] = 1.0  # outside the body crop: background
    full[(slice(None), *(slice(a, b) for a, b in box))] = probs
    del probs
    return np.stack([turn.undo(c) for c in full])


def keep_largest_component(label: np.ndarray, classes: Sequence[int] = SINGLE_ORGANS,
                           probabilities: np.ndarray | None = None, fill: int = BODY) -> np.ndarray:
    """Keep only the largest connected piece (26-neighbourhood) of each class in ``classes``.

    Voxels of the smaller pieces take their next most probable class when ``probabilities``
    ``(C, *label.shape)`` are given, else ``fill``. Classes not listed are never removed.

    Example:
        >>> lab = np.zeros((7, 1, 1), np.uint8); lab[0:3] = 3; lab[5] = 3
        >>> keep_largest_component(lab, (3,), fill=1)[:, 0, 0].tolist()
        [3, 3, 3, 0, 0, 1, 0]
    """
    out = np.array(label, copy=True)
    full = np.ones((3, 3, 3), bool)
    for c in classes:
        mask = out == c
        parts, n = ndimage.label(mask, structure=full)
        if n <= 1:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        drop = mask & (parts != 1 + int(np.argmax(sizes)))
        if probabilities is not None:
            p = probabilities[:, drop].copy()
            p[c] = -1.0
            out[drop] = p.argmax(0)
        else:
            out[drop] = fill
    return out


def labels_from_probabilities(probabilities: np.ndarray, postprocess: bool = DEFAULT_POSTPROCESS) -> np.ndarray:
    """Arg-max label map (uint8); with ``postprocess``, :func:`keep_largest_component` of each single organ."""
    label = probabilities.argmax(0).astype(np.uint8)
    if postprocess:
        label = keep_largest_component(label, SINGLE_ORGANS, probabilities)
    return label


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy of the class probabilities ``(C, ...)``, divided by log(C): 0 = certain,
    1 = all classes equally likely."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(0) / math.log(probabilities.shape[0])


def predict_array(model: ResUNet3D, image: np.ndarray, affine: np.ndarray, preprocessing: Preprocessing,
                  device: str | torch.device = "cpu", memory_bytes: int | None = None,
                  tta: bool = DEFAULT_TTA, postprocess: bool = DEFAULT_POSTPROCESS,
                  return_probabilities: bool = False):
    """Segment one image array; the result is a uint8 label map with ``image``'s shape.

    Arguments as :func:`predict_probabilities`; ``postprocess`` keeps the largest piece of each
    single-organ class (:data:`SINGLE_ORGANS`). With ``return_probabilities``, returns
    ``(label, probabilities)``.
    """
    probs = predict_probabilities(model, image, affine, preprocessing, device, memory_bytes, tta)
    label = labels_from_probabilities(probs, postprocess)
    return (label, probs) if return_probabilities else label


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a list of NIfTI files (one-line errors for bad ones)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise HipsegError(f"{p}: no such file or folder")
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_nifti(f))
            if not found:
                raise HipsegError(f"{p}: folder holds no .nii or .nii.gz files")
            files += found
        elif is_nifti(p):
            files.append(p)
        else:
            raise HipsegError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
    if not files:
        raise HipsegError("no input files given")
    return files


def _stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]


def prediction_name(path: Path) -> str:
    """``Case_004_Week0_LFOV.nii.gz`` -> ``Case_004_Week0_LFOV_pred.nii.gz``."""
    return f"{_stem(path)}_pred.nii.gz"


def probabilities_name(path: Path) -> str:
    """``Case_004_Week0_LFOV.nii.gz`` -> ``Case_004_Week0_LFOV_probs.nii.gz``."""
    return f"{_stem(path)}_probs.nii.gz"


def _check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HipsegError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise HipsegError(f"{out}: output folder is not writable")


def _save_probabilities(probs: np.ndarray, affine: np.ndarray, path: Path, overwrite: bool) -> None:
    # NIfTI-1 has no float16: uint16 with a scale factor takes the same two bytes per value, reads
    # back as floats in any NIfTI reader, and is finer than float16 near 1 (steps of 1/65535).
    header = nib.Nifti1Header()
    header["descrip"] = ("hipseg probabilities: " + ",".join(CLASS_NAMES))[:79].encode()
    header.set_intent("vector", (), name="class probabilities")
    quantised = np.rint(np.moveaxis(probs, 0, -1) * 65535).astype(np.uint16)
    save_nifti_atomic(quantised, affine, path, header=header, overwrite=overwrite, scale=1 / 65535)


def _check_inputs(files: Sequence[Path], progress: bool) -> None:
    """Read every input once, so that a bad one is named before any output is written.

    Raises one :class:`HipsegError` naming the first bad file and how many more there are."""
    problems = []
    it = files
    if progress and len(files) > 1:
        from .progress import progress as tqdm
        it = tqdm(files, desc="check", unit="vol")
    for f in it:
        try:
            problem = constant_image_problem(load_volume(f, "image"))
        except HipsegError as exc:
            problem = str(exc)
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} more bad input(s))" if len(problems) > 1 else ""
        raise HipsegError(problems[0] + more + "; nothing was written")


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  device: str = "auto", overwrite: bool = False, progress: bool = True, tta: bool = DEFAULT_TTA,
                  postprocess: bool = DEFAULT_POSTPROCESS, probabilities: bool = False) -> list[Path]:
    """Segment NIfTI files with a checkpoint; write ``<name>_pred.nii.gz`` label maps to ``out_dir``,
    and with ``probabilities`` also ``<name>_probs.nii.gz``: the per-class probabilities as a 4D
    image (x, y, z, class) on the input's grid.

    Everything is checked before the first file is written: every input is read in full (a
    truncated or corrupt file, a non-3D or non-finite or constant image stops the run, naming
    it, with nothing written; the volumes are read again to predict, which costs little next to
    the network), the checkpoint loads, the output folder is writable and no output exists
    (unless ``overwrite``). Each output is written atomically. Returns the label maps written.
    """
    from .runtime import resolve_device

    files = collect_inputs(inputs)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev, expect_classes=NUM_CLASSES)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    out = Path(out_dir)
    _check_output_folder(out)
    targets = [out / prediction_name(f) for f in files]
    prob_targets = [out / probabilities_name(f) for f in files] if probabilities else []
    if len(set(targets)) != len(targets):
        raise HipsegError("two inputs share a file name; predict them into separate folders")
    if not overwrite:
        for t in targets + prob_targets:
            if t.exists():
                raise HipsegError(f"{t}: already exists (use --overwrite to replace it)")
    _check_inputs(files, progress)
    it = list(zip(files, targets))
    if progress:
        from .progress import progress as tqdm
        it = tqdm(it, desc="predict", unit="vol")
    written = []
    for n, (f, target) in enumerate(it):
        vol = load_volume(f, "image")
        probs = predict_probabilities(model, vol.array, vol.affine, prep, dev, tta=tta)
        label = labels_from_probabilities(probs, postprocess)
        header = vol.header.copy() if vol.header is not None else None
        if header is not None:
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(1, 0)
        if probabilities:
            _save_probabilities(probs, vol.affine, prob_targets[n], overwrite)
        del probs
        save_nifti_atomic(label, vol.affine, target, header=header, overwrite=overwrite)
        written.append(target)
    return written
