"""Segmenting scans with a trained checkpoint, and scoring predictions against truths.

:func:`predict_array` applies the checkpoint's own preprocessing (orientation, intensity
normalisation, resize), runs the network on the whole volume or in sliding windows when the
whole volume would not fit in memory, resizes the class scores back to the input grid and
takes the arg-max: the result has the input's shape and orientation.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import CLASS_NAMES, NUM_CLASSES, HipsegError
from ._atomic import atomic_path
from .checkpoint import load_model
from .io import Pair, constant_image_problem, is_nifti, load_pair, load_volume, save_nifti_atomic
from .metrics import evaluate_case, summarise
from .model import ResUNet3D
from .preprocess import Preprocessing, preprocess_image, reorient

__all__ = ["predict_array", "sliding_window_logits", "collect_inputs", "prediction_name", "predict_files",
           "evaluate_pairs", "evaluate_folders", "results_document", "write_json_atomic", "format_summary"]


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _inference_bytes(model: ResUNet3D, shape: Sequence[int]) -> int:
    # Peak inference memory is dominated by a few full-resolution feature maps.
    return int(np.prod(shape)) * model.config.base_channels * 4 * 8


def sliding_window_logits(model: ResUNet3D, x: torch.Tensor, patch: Sequence[int], overlap: float = 0.25) -> torch.Tensor:
    """Class scores of ``x`` (N, C_in, X, Y, Z) from overlapping patches, averaged where they overlap."""
    size = x.shape[2:]
    patch = [min(p, s) for p, s in zip(patch, size)]
    starts = []
    for s, p in zip(size, patch):
        step = max(1, int(p * (1 - overlap)))
        pos = list(range(0, max(s - p, 0) + 1, step))
        if pos[-1] != s - p:
            pos.append(s - p)
        starts.append(pos)
    classes = getattr(model, "module", model).config.num_classes
    out = torch.zeros((x.shape[0], classes, *size), dtype=torch.float32, device=x.device)
    weight = torch.zeros((1, 1, *size), dtype=torch.float32, device=x.device)
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                sl = (slice(None), slice(None), slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
                out[sl] += model(x[sl]).float()
                weight[sl] += 1
    return out / weight


@torch.no_grad()
def predict_array(model: ResUNet3D, image: np.ndarray, affine: np.ndarray, preprocessing: Preprocessing,
                  device: str | torch.device = "cpu", memory_bytes: int | None = None,
                  return_scores: bool = False):
    """Segment one image array; the result is a uint8 label map with ``image``'s shape.

    Args:
        model: a network in eval mode.
        image: 3D intensities in the file's voxel order.
        affine: the file's affine (its orientation is undone at the end).
        preprocessing: the checkpoint's preprocessing.
        device: where to run.
        memory_bytes: memory the inference may use (default: what is free); when the whole
            volume needs more, sliding windows of half the size are used.
        return_scores: also return the softmax probabilities ``(C, X, Y, Z)`` on the input grid
            in the preprocessing orientation.
    """
    device = torch.device(device)
    turn = reorient(affine, preprocessing.orientation)
    arr = turn.apply(np.asarray(image, dtype=np.float32))
    x, box = preprocess_image(arr, preprocessing)
    xt = torch.from_numpy(x)[None, None].to(device)
    budget = memory_bytes if memory_bytes is not None else _available_bytes(device) // 2
    patch = getattr(model, "inference_patch", None)  # a network trained on patches sees patches
    if patch:
        logits = sliding_window_logits(model, xt, patch, overlap=0.5)
    elif _inference_bytes(model, xt.shape[2:]) <= budget:
        logits = model(xt).float()
    else:
        div = model.divisor
        patch = [max(div, (s // 2) // div * div) for s in xt.shape[2:]]
        logits = sliding_window_logits(model, xt, patch)
    crop_shape = tuple(b - a for a, b in box)
    logits = F.interpolate(logits, size=crop_shape, mode="trilinear", align_corners=False)
    probs = torch.softmax(logits, 1)[0].cpu()
    full = torch.zeros((probs.shape[0], *arr.shape), dtype=probs.dtype)
    full[0] = 1.0  # outside the body crop: background
    full[(slice(None), *(slice(a, b) for a, b in box))] = probs
    label = full.argmax(0).to(torch.uint8).numpy()
    out = turn.undo(label)
    if return_scores:
        return out, full.numpy()
    return out


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


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  device: str = "auto", overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Segment NIfTI files with a checkpoint; write ``<name>_pred.nii.gz`` label maps to ``out_dir``.

    Everything is checked before the first file is written: inputs exist and are NIfTI,
    the checkpoint loads, the output folder is writable and no output exists (unless
    ``overwrite``). Each output is written atomically.
    """
    from .train import resolve_device

    files = collect_inputs(inputs)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev, expect_classes=NUM_CLASSES)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HipsegError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise HipsegError(f"{out}: output folder is not writable")
    targets = [out / prediction_name(f) for f in files]
    if len(set(targets)) != len(targets):
        raise HipsegError("two inputs share a file name; predict them into separate folders")
    if not overwrite:
        for t in targets:
            if t.exists():
                raise HipsegError(f"{t}: already exists (use --overwrite to replace it)")
    it = zip(files, targets)
    if progress:
        from .progress import progress as tqdm
        it = tqdm(list(it), desc="predict", unit="vol")
    written = []
    for f, target in it:
        vol = load_volume(f, "image")
        constant = constant_image_problem(vol)
        if constant:
            raise HipsegError(constant)
        label = predict_array(model, vol.array, vol.affine, prep, dev)
        header = vol.header.copy() if vol.header is not None else None
        if header is not None:
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(1, 0)
        save_nifti_atomic(label, vol.affine, target, header=header, overwrite=overwrite)
        written.append(target)
    return written


def evaluate_pairs(model: ResUNet3D, preprocessing: Preprocessing, pairs: Sequence[Pair],
                   device: str | torch.device = "cpu", keep_predictions: bool = False,
                   progress: bool = False) -> list[dict]:
    """Predict each pair's image with ``model`` and score it against its label on the original grid.

    Returns one dict per pair: ``id``, ``metrics`` (dice, iou, hd95, asd per class) and, with
    ``keep_predictions``, the ``image``, ``truth`` and ``pred`` arrays.
    """
    it = pairs
    if progress:
        from .progress import progress as tqdm
        it = tqdm(pairs, desc="evaluate", unit="vol", leave=False)
    results = []
    for pair in it:
        image, truth = load_pair(pair)
        pred = predict_array(model, image.array, image.affine, preprocessing, device)
        row = {"id": str(pair.id), "case": pair.id.case,
               "metrics": evaluate_case(pred, truth.array, image.spacing)}
        if keep_predictions:
            row.update(image=image.array, truth=truth.array, pred=pred, spacing=image.spacing)
        results.append(row)
    return results


_ID_RE = re.compile(r"(?:Case_)?([A-Za-z]?\d+)_Week(\d+)")


def _match_key(path: Path) -> str:
    m = _ID_RE.search(path.name)
    if m:
        return f"{m.group(1)}_Week{int(m.group(2))}"
    stem = _stem(path)
    for suffix in ("_pred", "_SEMANTIC", "_LFOV", "_seg", "_label"):
        stem = stem.replace(suffix, "")
    return stem


def evaluate_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, progress: bool = False) -> dict:
    """Pair predictions with truths by name (case and week when the names carry them) and score them.

    Returns ``{"cases": [{"id", "metrics": {metric: {class: value}}}], "summary": ...,
    "unmatched": [predictions with no truth], "truths_without_prediction": [...]}``.
    """
    preds = collect_inputs([pred_dir])
    truths = collect_inputs([truth_dir])
    by_key = {}
    for t in truths:
        by_key.setdefault(_match_key(t), t)
    cases, unmatched, per_case = [], [], []  # unmatched: predictions with no truth
    matched = [(p, by_key.get(_match_key(p))) for p in preds]
    if not any(t for _, t in matched):
        raise HipsegError(f"{pred_dir}: no prediction matches a file in {truth_dir} by name")
    it = matched
    if progress:
        from .progress import progress as tqdm
        it = tqdm(matched, desc="evaluate", unit="vol")
    used = set()
    for p, t in it:
        if t is None:
            unmatched.append(str(p))
            continue
        used.add(t)
        pred = load_volume(p, "label")
        truth = load_volume(t, "label")
        if pred.shape != truth.shape:
            raise HipsegError(f"{p}: shape {pred.shape} differs from its truth {t.name} {truth.shape}")
        m = evaluate_case(pred.array, truth.array, truth.spacing)
        per_case.append(m)
        cases.append({"id": _match_key(p), "prediction": str(p), "truth": str(t),
                      "metrics": _named(m)})
    return {"cases": cases, "summary": summarise(per_case), "unmatched": unmatched,
            "truths_without_prediction": [str(t) for t in truths if t not in used],
            "classes": list(CLASS_NAMES)}


def _named(metrics: dict[str, np.ndarray]) -> dict:
    return {k: {n: (None if np.isnan(v) else float(v)) for n, v in zip(CLASS_NAMES, vals)}
            for k, vals in metrics.items()}


def results_document(results: list[dict], extra: dict | None = None) -> dict:
    """JSON-ready document from :func:`evaluate_pairs` rows: per case and overall."""
    return {"classes": list(CLASS_NAMES),
            "cases": [{"id": r["id"], "metrics": _named(r["metrics"])} for r in results],
            "summary": summarise([r["metrics"] for r in results]), **(extra or {})}


def write_json_atomic(doc: dict, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise HipsegError(f"{path}: already exists (use --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2))
    return path


def format_summary(summary: dict, metrics: Sequence[str] = ("dice", "iou", "hd95", "asd")) -> str:
    """Table of mean (std) per class for each metric."""
    head = f"{'metric':<8}" + "".join(f"{n:>17}" for n in CLASS_NAMES)
    lines = [head, "-" * len(head)]
    for m in metrics:
        if m not in summary:
            continue
        cells = []
        for n in CLASS_NAMES:
            s = summary[m][n]
            cells.append(f"{'n/a':>17}" if s["mean"] is None else f"{s['mean']:>9.3f} ({s['std']:.3f})")
        unit = " mm" if m in ("hd95", "asd") else ""
        lines.append(f"{m + unit:<8}" + "".join(cells))
    return "\n".join(lines)
