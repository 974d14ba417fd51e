"""``hipseg export``: a trained checkpoint as ONNX or TorchScript, for tools without hipseg.

Each export writes the model and a JSON file beside it (:data:`~hipseg_lib.predict.EXPORT_FORMAT`):
what a user of another tool needs to give the network what it saw in training (orientation, the
body-crop rule, the intensity normalisation, the grid, sizes it takes), and what its outputs
mean (class names and indices). Before anything is written the exported model is run beside the
PyTorch one on a synthetic scan, at the training grid and at a window of half of it (the sizes
are left free in the exported graph). In fp32 the two must agree: logits within :data:`TOLERANCE`
of the largest logit (at least 1), and the same label wherever PyTorch's two best classes are
further apart than twice the largest difference (closer than that, the two runtimes' rounding
decides: such ties are counted in the JSON). Otherwise the export fails and writes nothing.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import CLASS_NAMES, HipsegError, OutputExists, __version__, first_line
from ._atomic import atomic_path, write_json_atomic
from .checkpoint import LoadedModel, load_model, trained_mirror_axes
from .model import ResUNet3D
from .predict import EXPORT_FORMAT, OnnxModel, sidecar_path
from .predictor import SINGLE_ORGANS
from .preprocess import Preprocessing, preprocess_image

__all__ = ["export_model", "FORMATS", "OPSET", "TOLERANCE", "export_names"]

FORMATS = ("onnx", "torchscript")
OPSET = 17  # ONNX opset: read by ONNX Runtime 1.14 and later, and by 3D Slicer's ONNX Runtime
# Largest logit difference allowed between the exported model and PyTorch (fp32), as a share of the
# largest logit (at least 1). The smoke and cpu networks stay within 1e-4 absolute (tests/test_export.py);
# the full network at 192x160x128 differed by 1.4e-4 of its largest logit under ONNX Runtime.
TOLERANCE = 3e-4


def export_names(checkpoint: str | os.PathLike, fmt: str, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The model file and its JSON: ``new_model.onnx`` + ``new_model.json``, or
    ``new_model.torchscript.pt`` + ``new_model.torchscript.json``."""
    stem = Path(checkpoint).name.split(".")[0]
    model = Path(out_dir) / (f"{stem}.onnx" if fmt == "onnx" else f"{stem}.torchscript.pt")
    return model, sidecar_path(model)


def _example_input(prep: Preprocessing) -> torch.Tensor:
    """A synthetic scan preprocessed as training would: the network input the check runs on."""
    from .synth import SynthSpec, make_case_anatomy, render_volume

    rng = np.random.default_rng(0)
    spec = SynthSpec(shape=(128, 128, 64), spacing=(1.6, 1.6, 2.5))
    image, _ = render_volume(make_case_anatomy(rng), spec, rng)
    x, _ = preprocess_image(image, prep)
    return torch.from_numpy(x)[None, None]


def _sidecar(loaded: LoadedModel, fmt: str, model_file: Path, checkpoint: Path, checked: list[dict]) -> dict:
    model, prep, inference, ckpt = loaded
    cfg = model.config
    return {
        "format": EXPORT_FORMAT, "hipseg_version": __version__, "torch_version": torch.__version__,
        "exported_from": checkpoint.name, "model_file": model_file.name, "model_format": fmt,
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "input": {"name": "image", "layout": "N, 1, X, Y, Z", "dtype": "float32",
                  "divisible_by": model.divisor, "grid": list(prep.target_shape)},
        "output": {"name": "logits", "layout": "N, C, X, Y, Z", "dtype": "float32",
                   "meaning": "class scores before a softmax over C"},
        "class_names": list(CLASS_NAMES), "class_indices": {n: i for i, n in enumerate(CLASS_NAMES)},
        "preprocessing": prep.to_dict(),
        "preprocessing_steps": [
            f"turn the voxel axes to {prep.orientation} (nibabel's io_orientation of the file's affine)",
            f"crop to the body: Gaussian-smooth (sigma {prep.crop_smoothing} voxel), keep voxels above the "
            f"{prep.crop_percentiles[0]} percentile plus {prep.crop_threshold} of the way to the "
            f"{prep.crop_percentiles[1]} (none if fewer than {prep.crop_min_share} of all; per axis the rows "
            f"with at least {prep.crop_row_share} of the fullest row's), their box grown by "
            f"{prep.crop_margin} voxels" if prep.crop_foreground else "no crop",
            f"clip intensities to their {prep.clip_percentiles[0]} and {prep.clip_percentiles[1]} "
            "percentiles, then subtract the mean and divide by the standard deviation",
            f"resize trilinearly to {'x'.join(map(str, prep.target_shape))} (align_corners=False)",
            "after the network: softmax, resize the probabilities back to the crop, background outside it, "
            "undo the axis turn"],
        "inference": inference.to_dict(),
        "trained_mirror_axes": list(trained_mirror_axes(ckpt)),
        "inference_steps": [
            "windows (when a window is given): Gaussian weights, sigma 1/8 of the window per axis",
            "test-time mirroring: the mean probabilities of the input mirrored along every subset of "
            "mirror_axes (spatial axes 0, 1, 2), each mirrored back",
            f"postprocess: keep the largest 26-connected piece of classes {list(SINGLE_ORGANS)}"],
        "network": {"model_config": cfg.to_dict(), "epoch": ckpt.get("epoch")},
        "checked_against_pytorch": checked,
    }


def _export(model: torch.nn.Module, x: torch.Tensor, fmt: str, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices, not errors
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, x, check_trace=False), path)
            return
        spatial = {0: "batch", 2: "x", 3: "y", 4: "z"}
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": spatial, "logits": spatial})


def _runner(fmt: str, path: str):
    if fmt == "torchscript":
        loaded = torch.jit.load(path)
        return lambda x: loaded(x).detach().numpy()
    session = OnnxModel.session_for(path)
    return lambda x: session.run(None, {"image": x.numpy()})[0]


def _check(model: ResUNet3D, run, x: torch.Tensor) -> list[dict]:
    """The exported model beside PyTorch at the grid and at a window of half of it."""
    half = [max(model.divisor, s // 2 // model.divisor * model.divisor) for s in x.shape[2:]]
    rows = []
    for inp in (x, x[:, :, :half[0], :half[1], :half[2]].contiguous()):
        with torch.no_grad():
            ref = model(inp).numpy()
        got = run(inp)
        diff = float(np.abs(got - ref).max())
        allowed = TOLERANCE * max(1.0, float(np.abs(ref).max()))
        top2 = np.sort(ref, axis=1)[:, -2:]
        tied = (top2[:, 1] - top2[:, 0]) <= 2 * diff
        differ = got.argmax(1) != ref.argmax(1)
        rows.append({"input": list(inp.shape), "max_abs_logit_difference": diff, "allowed": allowed,
                     "labels_equal": bool(not differ.any()), "tied_voxels": int(tied.sum()),
                     "labels_differing_at_ties": int((differ & tied).sum())})
        if diff > allowed or (differ & ~tied).any():
            raise HipsegError(f"the exported model differs from PyTorch at input {tuple(inp.shape)}: largest "
                              f"logit difference {diff:.2e} (allowed {allowed:.2e}), "
                              f"{int((differ & ~tied).sum())} labels differ beyond ties")
    return rows


def export_model(checkpoint: str | os.PathLike, fmt: str, out_dir: str | os.PathLike,
                 overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``checkpoint``'s network as ``fmt`` (``onnx`` or ``torchscript``) into ``out_dir``,
    with its JSON; both are checked first (see the module) and written atomically.

    Returns:
        ``(model file, JSON file)``.
    """
    if fmt not in FORMATS:
        raise HipsegError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    model_file, json_file = export_names(checkpoint, fmt, out_dir)
    if not overwrite:
        for f in (model_file, json_file):
            if f.exists():
                raise OutputExists(f)
    loaded = load_model(checkpoint, "cpu")
    model = loaded.network
    x = _example_input(loaded.preprocessing)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_file) as tmp:
        try:
            _export(model, x, fmt, tmp)
        except (RuntimeError, TypeError, ValueError, ImportError, OSError) as exc:  # the exporters' failures
            raise HipsegError(f"{checkpoint}: export to {fmt} failed ({first_line(exc, 160)})") from None
        checked = _check(model, _runner(fmt, tmp), x)
    write_json_atomic(_sidecar(loaded, fmt, model_file, checkpoint, checked), json_file)
    return model_file, json_file


def describe(json_file: Path) -> str:
    """One line for the command line: what was checked, from the JSON just written."""
    doc = json.loads(Path(json_file).read_text())
    worst = max(r["max_abs_logit_difference"] for r in doc["checked_against_pytorch"])
    ties = sum(r["labels_differing_at_ties"] for r in doc["checked_against_pytorch"])
    return (f"{doc['model_format']}: logits within {worst:.1e} of PyTorch's at "
            f"{len(doc['checked_against_pytorch'])} input sizes, the same labels"
            + (f" except {ties} voxel(s) where two classes tie within that" if ties else ""))
