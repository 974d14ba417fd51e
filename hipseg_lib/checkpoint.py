"""Checkpoints: atomic writes, metadata, and safe loading (``weights_only=True``).

A checkpoint is a dict of plain Python values and tensors, so it loads with
``torch.load(weights_only=True)``: opening a file cannot run code.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import CLASS_NAMES, HipsegError, __version__, first_line
from ._atomic import atomic_path
from .cpu_kernels import use_cpu_kernels
from .model import ModelConfig, ResUNet3D
from .preprocess import Preprocessing

__all__ = ["FORMAT", "save_checkpoint", "read_checkpoint", "load_model", "LoadedModel"]

# v2: every network and preprocessing setting stored by its own name (v1, before the first
# release, left out settings that did not exist yet and is not read any more)
FORMAT = "hipseg-checkpoint-v2"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, model_config: ModelConfig,
                    preprocessing: Preprocessing, **extra: Any) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, fsync, rename.

    A process killed at any moment leaves either the previous complete file or the new one.

    Args:
        path: destination, e.g. ``model/last.pth``.
        model: the network (a DDP or compiled wrapper is unwrapped).
        model_config: its architecture.
        preprocessing: what the inputs went through.
        **extra: epoch, metrics, optimizer state, ... (plain values and tensors only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {
        "format": FORMAT,
        "library_version": __version__,
        "class_names": list(CLASS_NAMES[: model_config.num_classes]),
        "model_config": model_config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "model_state": state,
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a hipseg checkpoint dict safely, or raise :class:`HipsegError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise HipsegError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise HipsegError(f"{path}: is a folder, expected a checkpoint file")
    if not zipfile.is_zipfile(path):
        raise HipsegError(f"{path}: not a readable PyTorch checkpoint (not a torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HipsegError(f"{path}: refused to load (not plain weights; {first_line(exc, 120)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise HipsegError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc, 120)})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == "hipseg-checkpoint-v1":
        raise HipsegError(f"{path}: made by a pre-release hipseg (format v1), which this version does not "
                          "read; train it again (hipseg train)")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HipsegError(f"{path}: not a hipseg checkpoint (no '{FORMAT}' format marker)")
    for key in ("model_config", "preprocessing", "model_state"):
        if key not in ckpt:
            raise HipsegError(f"{path}: hipseg checkpoint lacks '{key}'")
    return ckpt


class LoadedModel(NamedTuple):
    """What :func:`load_model` gives: everything prediction needs from a checkpoint."""

    network: ResUNet3D  # in eval mode, on the device asked for (on a CPU with its CPU kernels)
    preprocessing: Preprocessing  # what its inputs went through in training
    window: tuple[int, int, int] | None  # trained on patches: predict in windows of this size
    checkpoint: dict  # the rest: epoch, metrics, train_config, ...


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               expect_classes: int | None = None) -> LoadedModel:
    """Rebuild the network stored in a checkpoint and load its weights.

    Args:
        path: checkpoint file.
        device: where to put the model.
        expect_classes: if given, refuse a checkpoint with another number of classes.

    Returns:
        The network with its preprocessing and inference window (:class:`LoadedModel`).
    """
    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
        model = ResUNet3D(cfg)
        prep = Preprocessing.from_dict(ckpt["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise HipsegError(f"{path}: unusable model configuration ({exc})") from None
    if expect_classes is not None and cfg.num_classes != expect_classes:
        raise HipsegError(f"{path}: checkpoint predicts {cfg.num_classes} classes, expected {expect_classes}")
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise HipsegError(f"{path}: weights do not fit a ResUNet3D of its stated configuration "
                          f"({first_line(exc, 120)})") from None
    patch = (ckpt.get("train_config") or {}).get("patch_shape")
    model = model.to(device).eval()
    if model.head.weight.device.type == "cpu":
        use_cpu_kernels(model)  # the same layers, faster kernels (cpu_kernels.py)
    return LoadedModel(model, prep, tuple(patch) if patch else None, ckpt)
