"""The parts of prediction that never needed PyTorch: post-processing, output names, the checks
before anything is written, and :class:`OnnxModel`, a network exported by ``hipseg export`` run by
ONNX Runtime.

With it, :meth:`hipseg_lib.predictor.Predictor.from_export` runs the whole of ``hipseg predict``
importing numpy, scipy, nibabel and onnxruntime, never torch, so a PC without PyTorch can segment
scans (``pip install onnxruntime nibabel scipy`` and this package).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import (
    BLADDER,
    BODY,
    CLASS_NAMES,
    DEFAULT_POSTPROCESS,
    NUM_CLASSES,
    PROSTATE,
    RECTUM,
    HipsegError,
    OutputExists,
    first_line,
)
from .hostinfo import available_memory
from .io import Volume, constant_image_problem, is_nifti, load_volume, save_nifti_atomic
from .preprocess import Preprocessing

__all__ = ["SINGLE_ORGANS", "EXPORT_FORMAT", "keep_largest_component", "labels_from_probabilities", "entropy",
           "collect_inputs", "file_stem", "prediction_name", "probabilities_name", "plan_outputs",
           "save_label_map", "check_inputs", "save_probabilities", "OnnxModel", "sidecar_path"]

EXPORT_FORMAT = "hipseg-export-1"  # the JSON beside an exported model; bump when its meaning changes

# Classes that are one connected organ: post-processing keeps the largest piece of each.
# Bones (pelvis and both femora) and the body are left alone.
SINGLE_ORGANS: tuple[int, ...] = (BLADDER, RECTUM, PROSTATE)


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


def plan_outputs(files: Sequence[Path], out_dir: str | os.PathLike, overwrite: bool = False,
                 probabilities: bool = False) -> tuple[list[Path], list[Path]]:
    """The label maps ``<name>_pred.nii.gz`` (and with ``probabilities`` the ``<name>_probs.nii.gz``)
    that predicting ``files`` into ``out_dir`` writes, checked before anything is written: the
    folder is writable, no two inputs share a name and no output exists (unless ``overwrite``)."""
    out = Path(out_dir)
    check_output_folder(out)
    targets = [out / prediction_name(f) for f in files]
    prob_targets = [out / probabilities_name(f) for f in files] if probabilities else []
    if len(set(targets)) != len(targets):
        raise HipsegError("two inputs share a file name; predict them into separate folders")
    if not overwrite:
        for t in targets + prob_targets:
            if t.exists():
                raise OutputExists(t)
    return targets, prob_targets


def save_label_map(label: np.ndarray, like: Volume, path: Path, overwrite: bool = False) -> None:
    """Write a uint8 label map atomically with the geometry (affine, header) of the scan it came from."""
    header = like.header.copy() if like.header is not None else None
    if header is not None:
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
    save_nifti_atomic(label, like.affine, path, header=header, overwrite=overwrite)


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``x.onnx`` -> ``x.json``: the settings file ``hipseg export`` writes beside a model."""
    return Path(model_path).with_suffix(".json")


class OnnxModel:
    """An exported network run by ONNX Runtime on the CPU, with the settings of its JSON file.

    Attributes: ``preprocessing`` (:class:`Preprocessing`), ``divisor`` (sizes the network takes
    are multiples of it), ``window`` (the patch it was trained on, or None), ``tta_axes``,
    ``base_channels`` (for the memory estimate), ``class_names``. A
    :class:`~hipseg_lib.predictor.Backend`: it runs on the CPU, in fp32.
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
        state = ort.capi.onnxruntime_pybind11_state  # where ONNX Runtime's own exception types live
        expected = (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile, state.InvalidArgument,
                    state.RuntimeException, RuntimeError, OSError)
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except expected as exc:  # a file that is not a model, or a model this runtime cannot run
            raise HipsegError(f"{path}: not a loadable ONNX model ({first_line(exc, 120)})") from None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``(N, C, X, Y, Z)`` of ``x`` ``(N, 1, X, Y, Z)``, float32."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def free_bytes(self) -> int:
        """What the host has free (ONNX Runtime runs on the CPU)."""
        return available_memory()
