"""``hipseg predict``: segmenting files, with a checkpoint or with an exported model, and writing
the results; everything here runs without PyTorch.

:class:`OnnxModel` runs a network exported by ``hipseg export`` with ONNX Runtime, so that a PC
without PyTorch can segment scans (``pip install onnxruntime nibabel scipy`` and this package):
:func:`onnx_predictor` gives it the same :class:`~hipseg_lib.predictor.Predictor` a checkpoint
gets.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from . import CLASS_NAMES, NUM_CLASSES, HipsegError, OutputExists, available_cpus, first_line
from ._atomic import save_nifti_atomic
from .io import Volume, constant_image_problem, is_nifti, load_volume
from .predictor import InferenceSettings, Predictor, labels_from_probabilities
from .preprocess import Preprocessing

__all__ = ["EXPORT_FORMAT", "collect_inputs", "file_stem", "prediction_name", "probabilities_name",
           "plan_outputs", "save_label_map", "save_probabilities", "OnnxModel",
           "sidecar_path", "onnx_predictor", "predict_files"]

EXPORT_FORMAT = "hipseg-export-2"  # the JSON beside an exported model; bump when its meaning changes



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


def save_label_map(label: np.ndarray, like: Volume, path: Path,
                   overwrite: bool = False) -> None:
    """Write a uint8 label map atomically with the geometry (affine,
    header) of the scan it came from."""
    header = like.header.copy() if like.header is not None else None
    if header is not None:
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
    save_nifti_atomic(label, like.affine, path, header=header,
                      overwrite=overwrite)


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``x.onnx`` -> ``x.json``: the settings file ``hipseg export`` writes beside a model."""
    return Path(model_path).with_suffix(".json")


class OnnxModel:
    """An exported network run by ONNX Runtime on the CPU: a
    :class:`~hipseg_lib.predictor.Backend`, with the preprocessing and inference settings of the
    JSON file beside it (``preprocessing``, ``inference``, ``class_names``)."""

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
            self.inference = InferenceSettings.from_dict(meta["inference"])
            self.trained_mirror_axes = tuple(meta["trained_mirror_axes"])
            self.class_names = list(meta["class_names"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HipsegError(f"{side}: unreadable export settings ({first_line(exc, 120)})") from None
        if len(self.class_names) != NUM_CLASSES:
            raise HipsegError(f"{side}: the model predicts {len(self.class_names)} classes, expected {NUM_CLASSES}")
        self.session = self.session_for(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    @staticmethod
    def session_for(path: str | os.PathLike, threads: int | None = None):
        """An ONNX Runtime session on the CPU for the model file at ``path``."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise HipsegError("onnxruntime is not installed: pip install onnxruntime (requirements.txt pins it)") \
                from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()
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


def onnx_predictor(path: str | os.PathLike, tta: bool | None = None, **changes) -> Predictor:
    """An exported network (``.onnx`` with its JSON) as a :class:`~hipseg_lib.predictor.Predictor`
    with the export's preprocessing and inference settings (``changes`` override them; ``tta`` as
    :func:`~hipseg_lib.checkpoint.load_predictor`'s)."""
    model = OnnxModel(path)
    if tta is not None:
        changes["mirror_axes"] = model.trained_mirror_axes if tta else ()
    return Predictor(model, model.preprocessing, dataclasses.replace(model.inference, **changes))


def predict_files(predictor: Predictor, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  overwrite: bool = False, progress: bool = True, probabilities: bool = False) -> list[Path]:
    """``<name>_pred.nii.gz`` for every NIfTI file in ``inputs`` (files or folders), and with
    ``probabilities`` ``<name>_probs.nii.gz`` beside it; returns the label maps written.

    All or nothing: the outputs are written into a hidden staging folder inside ``out_dir`` and
    moved into place only once every input has been read (each once) and segmented, so a bad
    input (truncated, not 3D, non-finite or constant) stops the run, naming it, with nothing
    written.
    """
    files = collect_inputs(inputs)
    targets, prob_targets = plan_outputs(files, out_dir, overwrite, probabilities)
    staging = Path(tempfile.mkdtemp(prefix=".hipseg-predict-", dir=out_dir))
    try:
        todo: Iterable = list(enumerate(files))
        if progress:
            from .progress import progress as bar
            todo = bar(todo, desc="predict", unit="vol")
        for n, f in todo:
            try:
                vol = load_volume(f, "image")
            except HipsegError as exc:
                raise HipsegError(f"{exc}; nothing was written") from None
            problem = constant_image_problem(vol)
            if problem:
                raise HipsegError(problem + "; nothing was written")
            probs = predictor.probabilities(vol.array, vol.affine)
            if probabilities:
                save_probabilities(probs, vol.affine, staging / prob_targets[n].name, True)
            label = labels_from_probabilities(probs, predictor.settings.postprocess)
            save_label_map(label, vol, staging / targets[n].name, True)
        for target in targets + prob_targets:
            if target.exists() and not overwrite:  # made meanwhile, by someone else
                raise OutputExists(target)
            os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets
