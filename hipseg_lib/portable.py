"""Prediction without PyTorch, and the parts of prediction that never needed it.

``hipseg export`` writes a trained network as ONNX with a JSON file beside it (the model's
inputs, preprocessing and inference settings). :func:`predict_files_onnx` runs the whole of
``hipseg predict`` with that file through ONNX Runtime: the checkpoint's preprocessing, the whole
volume or Gaussian-weighted windows, mirroring (TTA), the probabilities resized back to the
input's grid, the largest-component post-processing and NIfTI files with the input's header. It
imports numpy, scipy, nibabel and onnxruntime, never torch, so a PC without PyTorch can segment
scans (``pip install onnxruntime nibabel scipy`` and this package).

The same steps in :mod:`hipseg_lib.predict` run a PyTorch network; both use this module's
post-processing, window positions and weights, output names and checks.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import (BLADDER, BODY, CLASS_NAMES, DEFAULT_POSTPROCESS, DEFAULT_TTA, NUM_CLASSES, PROSTATE, RECTUM,
               HipsegError, __version__, first_line)
from .io import Volume, constant_image_problem, is_nifti, load_volume, save_nifti_atomic
from .preprocess import Preprocessing, preprocess_image, reorient, resize_linear, voxel_spacing

__all__ = ["SINGLE_ORGANS", "EXPORT_FORMAT", "keep_largest_component", "labels_from_probabilities", "entropy",
           "window_starts", "gaussian_weight_array", "collect_inputs", "prediction_name", "probabilities_name",
           "write_predictions", "OnnxModel", "onnx_probabilities", "predict_files_onnx", "sidecar_path"]

EXPORT_FORMAT = "hipseg-export-1"  # the JSON beside an exported model; bump when its meaning changes

# Classes that are one connected organ: post-processing keeps the largest piece of each.
# Bones (pelvis and both femora) and the body are left alone.
SINGLE_ORGANS: tuple[int, ...] = (BLADDER, RECTUM, PROSTATE)


def gaussian_weight_array(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights for a window (float32): a Gaussian with sigma ``sigma_scale`` times the
    window size per axis (nnU-Net's 1/8), 1 at the centre, small but never zero at the border.

    Example:
        >>> w = gaussian_weight_array((5, 5, 5))
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


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    step = max(1, int(patch * (1 - overlap)))
    pos = list(range(0, max(size - patch, 0) + 1, step))
    if pos[-1] != size - patch:
        pos.append(size - patch)
    return pos


def keep_largest_component(label: np.ndarray, classes: Sequence[int] = SINGLE_ORGANS,
                           probabilities: np.ndarray | None = None, fill: int = BODY) -> np.ndarray:
    """Keep only the largest connected piece (26-neighbourhood) of each class in ``classes``; when
    several pieces tie for largest, all of them, so that the result does not depend on the order
    in which the voxels are stored (a scan in another orientation gets the same labels).

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
        drop = mask & ~np.isin(parts, 1 + np.flatnonzero(sizes == sizes.max()))
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


def file_stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii.gz`` or ``.nii``."""
    name = path.name
    return name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]


def prediction_name(path: Path) -> str:
    """``Case_004_Week0_LFOV.nii.gz`` -> ``Case_004_Week0_LFOV_pred.nii.gz``."""
    return f"{file_stem(path)}_pred.nii.gz"


def probabilities_name(path: Path) -> str:
    """``Case_004_Week0_LFOV.nii.gz`` -> ``Case_004_Week0_LFOV_probs.nii.gz``."""
    return f"{file_stem(path)}_probs.nii.gz"


def check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HipsegError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise HipsegError(f"{out}: output folder is not writable")


def save_probabilities(probs: np.ndarray, affine: np.ndarray, path: Path, overwrite: bool) -> None:
    # NIfTI-1 has no float16: uint16 with a scale factor takes the same two bytes per value, reads
    # back as floats in any NIfTI reader, and is finer than float16 near 1 (steps of 1/65535).
    header = nib.Nifti1Header()
    header["descrip"] = ("hipseg probabilities: " + ",".join(CLASS_NAMES))[:79].encode()
    header.set_intent("vector", (), name="class probabilities")
    quantised = np.rint(np.moveaxis(probs, 0, -1) * 65535).astype(np.uint16)
    save_nifti_atomic(quantised, affine, path, header=header, overwrite=overwrite, scale=1 / 65535)


def check_inputs(files: Sequence[Path], progress: bool) -> None:
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


def write_predictions(files: Sequence[Path], out_dir: str | os.PathLike,
                      probabilities_of: Callable[[Volume], np.ndarray], overwrite: bool = False,
                      progress: bool = True, postprocess: bool = DEFAULT_POSTPROCESS,
                      probabilities: bool = False) -> list[Path]:
    """``<name>_pred.nii.gz`` (and with ``probabilities`` ``<name>_probs.nii.gz``) for each input,
    from ``probabilities_of(volume)`` ``(C, *shape)``; what both prediction paths share.

    Everything is checked before the first file is written: every input is read in full (a
    truncated or corrupt file, a non-3D or non-finite or constant image stops the run, naming
    it, with nothing written; the volumes are read again to predict, which costs little next to
    the network), the output folder is writable and no output exists (unless ``overwrite``).
    Each output is written atomically. Returns the label maps written.
    """
    out = Path(out_dir)
    check_output_folder(out)
    targets = [out / prediction_name(f) for f in files]
    prob_targets = [out / probabilities_name(f) for f in files] if probabilities else []
    if len(set(targets)) != len(targets):
        raise HipsegError("two inputs share a file name; predict them into separate folders")
    if not overwrite:
        for t in targets + prob_targets:
            if t.exists():
                raise HipsegError(f"{t}: already exists (use --overwrite to replace it)")
    check_inputs(files, progress)
    it = list(zip(files, targets))
    if progress:
        from .progress import progress as tqdm
        it = tqdm(it, desc="predict", unit="vol")
    written = []
    for n, (f, target) in enumerate(it):
        vol = load_volume(f, "image")
        probs = probabilities_of(vol)
        label = labels_from_probabilities(probs, postprocess)
        header = vol.header.copy() if vol.header is not None else None
        if header is not None:
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(1, 0)
        if probabilities:
            save_probabilities(probs, vol.affine, prob_targets[n], overwrite)
        del probs
        save_nifti_atomic(label, vol.affine, target, header=header, overwrite=overwrite)
        written.append(target)
    return written


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``x.onnx`` -> ``x.json``: the settings file ``hipseg export`` writes beside a model."""
    return Path(model_path).with_suffix(".json")


class OnnxModel:
    """An exported network run by ONNX Runtime on the CPU, with the settings of its JSON file.

    Attributes: ``preprocessing`` (:class:`Preprocessing`), ``divisor`` (sizes the network takes
    are multiples of it), ``window`` (the patch it was trained on, or None), ``tta_axes``,
    ``base_channels`` (for the memory estimate), ``class_names``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise HipsegError(f"{path}: no such model file")
        side = sidecar_path(path)
        if not side.is_file():
            raise HipsegError(f"{path}: no {side.name} beside it (hipseg export writes the two together)")
        try:
            meta = json.loads(side.read_text())
            if meta.get("format") != EXPORT_FORMAT or meta.get("model_format") != "onnx":
                raise ValueError(f"not a {EXPORT_FORMAT} file for an ONNX model")
            self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
            self.divisor = int(meta["input"]["divisible_by"])
            self.window = tuple(meta["inference"]["window"]) if meta["inference"]["window"] else None
            self.tta_axes = tuple(meta["inference"]["tta_axes"])
            self.base_channels = int(meta["network"]["base_channels"])
            self.class_names = list(meta["class_names"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HipsegError(f"{side}: unreadable export settings ({first_line(exc, 120)})") from None
        if len(self.class_names) != NUM_CLASSES:
            raise HipsegError(f"{side}: the model predicts {len(self.class_names)} classes, expected {NUM_CLASSES}")
        self.session = self.session_for(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.meta = meta

    @staticmethod
    def session_for(path: str | os.PathLike, threads: int | None = None):
        """An ONNX Runtime session on the CPU for the model file at ``path``."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise HipsegError("onnxruntime is not installed: pip install onnxruntime (requirements.txt pins it)") \
                from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a model
            raise HipsegError(f"{path}: not a loadable ONNX model ({first_line(exc, 120)})") from None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``(N, C, X, Y, Z)`` of ``x`` ``(N, 1, X, Y, Z)``, float32."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _window_logits(model: OnnxModel, x: np.ndarray, patch: Sequence[int], overlap: float = 0.5) -> np.ndarray:
    size = x.shape[2:]
    patch = [min(p, s) for p, s in zip(patch, size)]
    w = gaussian_weight_array(patch)
    out = norm = None
    for i, j, k in itertools.product(*(window_starts(s, p, overlap) for s, p in zip(size, patch))):
        sl = (slice(None), slice(None), slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
        y = model(x[sl])
        if out is None:
            out = np.zeros((x.shape[0], y.shape[1], *size), np.float32)
            norm = np.zeros(size, np.float32)
        out[sl] += y * w
        norm[sl[2:]] += w
    return out / norm


def _log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def onnx_probabilities(model: OnnxModel, image: np.ndarray, affine: np.ndarray, tta: bool = DEFAULT_TTA,
                       memory_bytes: int | None = None) -> np.ndarray:
    """Class probabilities ``(C, *image.shape)`` in the file's voxel order, as
    :func:`hipseg_lib.predict.predict_probabilities` computes them, with ``model`` run by ONNX Runtime."""
    prep = model.preprocessing
    turn = reorient(affine, prep.orientation)
    arr = turn.apply(np.asarray(image, dtype=np.float32))
    x, where = preprocess_image(arr, prep, turn.spacing(voxel_spacing(affine)), divisor=model.divisor)
    box = where.box
    x = x[None, None]
    budget = memory_bytes if memory_bytes is not None else _available_memory() // 2
    patch = model.window
    if not patch and int(np.prod(x.shape[2:])) * model.base_channels * 32 > budget:
        patch = [max(model.divisor, (s // 2) // model.divisor * model.divisor) for s in x.shape[2:]]
    acc, n = None, 0
    for flips in [c for r in range(len(model.tta_axes) * tta + 1)
                  for c in itertools.combinations(model.tta_axes, r)]:
        dims = tuple(2 + a for a in flips)
        xi = np.flip(x, dims) if dims else x
        logits = _window_logits(model, xi, patch) if patch else model(xi)
        logp = _log_softmax(logits.astype(np.float32))
        if dims:
            logp = np.flip(logp, dims)
        acc = logp if acc is None else np.logaddexp(acc, logp)
        n += 1
    logp = resize_linear(where.from_grid((acc - math.log(n))[0]), tuple(b - a for a, b in box))
    probs = np.exp(_log_softmax(logp, axis=0))
    full = np.zeros((probs.shape[0], *arr.shape), dtype=np.float32)
    full[0] = 1.0  # outside the body crop: background
    full[(slice(None), *(slice(a, b) for a, b in box))] = probs
    return np.stack([turn.undo(c) for c in full])


def predict_files_onnx(model_path: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                       out_dir: str | os.PathLike, overwrite: bool = False, progress: bool = True,
                       tta: bool = DEFAULT_TTA, postprocess: bool = DEFAULT_POSTPROCESS,
                       probabilities: bool = False) -> list[Path]:
    """``hipseg predict --model x.onnx``: :func:`write_predictions` with an exported model."""
    files = collect_inputs(inputs)
    model = OnnxModel(model_path)
    return write_predictions(files, out_dir, lambda v: onnx_probabilities(model, v.array, v.affine, tta),
                             overwrite, progress, postprocess, probabilities)
