"""Checkpoints: a trained network saved with what predicting needs, loaded
safely, and run as a :class:`~hipseg_lib.predictor.Predictor`.

A checkpoint is a dict of plain values and tensors, so it loads with
``torch.load(weights_only=True)``: opening a file cannot run code.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import CLASS_NAMES, HipsegError, SettingsError, __version__, first_line
from ._atomic import atomic_path
from .model import ModelConfig, ResUNet3D
from .predictor import ArrayOps, InferenceSettings, Predictor
from .preprocess import Preprocessing
from .runtime import autocast, cuda_has_bf16, resolve_device, resolve_precision

__all__ = ["FORMAT", "save_checkpoint", "read_checkpoint", "load_model",
           "LoadedModel", "TORCH_OPS", "TorchBackend", "load_predictor",
           "store_inference",
           "trained_mirror_axes"]

FORMAT = "hipseg-checkpoint-v4"


def save_checkpoint(path, network: torch.nn.Module,
                    preprocessing: Preprocessing, inference: InferenceSettings,
                    **extra: Any) -> Path:
    """Write the network's settings and weights, the preprocessing its
    inputs had, how it predicts, and ``extra`` (epoch, history, ...).
    ``inference`` is also kept as what the network trained with
    (``trained_mirror_axes``), which :func:`store_inference` leaves alone.

    The file is written whole or not at all (a temporary file, then
    renamed): a process killed at any moment leaves the previous file.
    """
    net = getattr(network, "module", network)  # DDP's
    config = getattr(net, "config", None)  # None: not a ResUNet3D
    payload = {"format": FORMAT, "library_version": __version__,
               "class_names": list(CLASS_NAMES),
               "model_config": config.to_dict() if config else None,
               "preprocessing": preprocessing.to_dict(),
               "inference": inference.to_dict(),
               "trained_mirror_axes": list(inference.mirror_axes),
               "model_state": {k: v.detach().cpu()
                               for k, v in net.state_dict().items()},
               **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path) -> dict:
    """A hipseg checkpoint's dict, loaded safely, or a one-line
    :class:`~hipseg_lib.HipsegError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HipsegError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise HipsegError(f"{path}: not a readable PyTorch checkpoint "
                          "(not a torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HipsegError(f"{path}: refused to load (not plain weights; "
                          f"{first_line(exc, 120)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            ValueError) as exc:
        raise HipsegError(f"{path}: not a readable PyTorch checkpoint "
                          f"({first_line(exc, 120)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise HipsegError(f"{path}: not a hipseg checkpoint of this version "
                          f"(no '{FORMAT}' marker)")
    return ckpt


class LoadedModel(NamedTuple):
    """What :func:`load_model` gives."""

    network: ResUNet3D  # in eval mode
    preprocessing: Preprocessing
    inference: InferenceSettings
    checkpoint: dict  # the rest: epoch, history, train_config, ...


def load_model(path, device="cpu") -> LoadedModel:
    """Rebuild the network a checkpoint stores, with its weights, on
    ``device``."""
    ckpt = read_checkpoint(path)
    try:
        network = ResUNet3D(ModelConfig.from_dict(ckpt["model_config"]))
        network.load_state_dict(ckpt["model_state"])
        prep = Preprocessing.from_dict(ckpt["preprocessing"])
        inference = InferenceSettings.from_dict(ckpt["inference"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise HipsegError(f"{path}: does not hold a network of its stated "
                          f"settings ({first_line(exc, 120)})") from None
    return LoadedModel(network.to(device).eval(), prep, inference, ckpt)


TORCH_OPS = ArrayOps(
    zeros=lambda shape, like: torch.zeros(shape, device=like.device),
    put=lambda a, like: torch.from_numpy(a).to(like.device),
    contiguous=lambda a: a.contiguous(), flip=torch.flip,
    logaddexp=torch.logaddexp, log_softmax=torch.log_softmax)


class TorchBackend:
    """A PyTorch network as a :class:`~hipseg_lib.predictor.Predictor`'s
    backend: numpy in, numpy out, or a tensor in, a tensor out on the same
    device (``TORCH_OPS`` its functions), computed on ``device`` without
    gradients, in ``precision``: bf16 or fp32 (``"auto"``: bf16 on a GPU that
    computes it natively, else fp32, so that every CPU predicts the same
    labels). Prediction never runs in fp16: asked for, it is refused."""

    ops = TORCH_OPS

    def __init__(self, network: torch.nn.Module, device="cpu",
                 precision: str = "auto"):
        self.network, self.device = network, torch.device(device)
        if precision == "auto":
            native = self.device.type == "cuda" and cuda_has_bf16()
            precision = "bf16" if native else "fp32"
        if precision == "fp16":
            raise SettingsError("prediction runs in bf16 or fp32, not fp16")
        self.dtype = resolve_precision(self.device, precision)

    def __call__(self, x):
        was_training = self.network.training
        self.network.eval()
        x_ = torch.as_tensor(x)
        try:
            with torch.no_grad(), autocast(self.device, self.dtype):
                y = self.network(x_.to(self.device)).float()
        finally:
            self.network.train(was_training)
        return y.to(x_.device) if torch.is_tensor(x) else y.cpu().numpy()


def trained_mirror_axes(checkpoint: dict) -> tuple[int, ...]:
    """The axes the checkpoint's training mirrored (what test-time mirroring
    uses, whatever inference the checkpoint now stores)."""
    return tuple(checkpoint["trained_mirror_axes"])


def load_predictor(path, device: str = "auto", precision: str = "auto",
                   tta: bool | None = None, **changes) -> Predictor:
    """A checkpoint's network on ``device`` as a
    :class:`~hipseg_lib.predictor.Predictor` with the checkpoint's
    preprocessing and inference settings (``changes`` override them).
    ``tta``: None keeps the stored mirroring; True mirrors along the axes
    training mirrored; False predicts once.

    Example:
        >>> p = load_predictor("model/new_model.pth", postprocess=False)
        ... # doctest: +SKIP
    """
    dev = resolve_device(device)
    loaded = load_model(path, dev)
    if tta is not None:
        changes["mirror_axes"] = \
            trained_mirror_axes(loaded.checkpoint) if tta else ()
    settings = InferenceSettings(**{**loaded.inference.to_dict(), **changes})
    backend = TorchBackend(loaded.network, dev, precision)
    return Predictor(backend, loaded.preprocessing, settings)


def store_inference(path, settings: InferenceSettings) -> None:
    """Write ``settings`` into a checkpoint: how its network predicts from
    now on (``hipseg predict``, an export). Chapter 5 stores the options
    its validation patients chose."""
    ckpt = read_checkpoint(path)
    ckpt["inference"] = settings.to_dict()
    with atomic_path(Path(path)) as tmp:
        torch.save(ckpt, tmp)
