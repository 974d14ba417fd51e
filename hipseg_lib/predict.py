"""Segmenting scans with a trained checkpoint: the PyTorch backend of the
:class:`~hipseg_lib.predictor.Predictor`.

:func:`load_predictor` rebuilds the network of a checkpoint on a device and returns a
:class:`~hipseg_lib.predictor.Predictor` with the checkpoint's preprocessing; the prediction steps
themselves (windows, mirroring, back to the scan's grid, post-processing) are the predictor's, the
same for a network exported to ONNX. Scoring predictions against truths lives in
:mod:`hipseg_lib.evaluate`.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Sequence, cast

import numpy as np
import torch

from . import NUM_CLASSES
from .checkpoint import load_model
from .model import ResUNet3D
from .portable import (
    SINGLE_ORGANS,
    collect_inputs,
    entropy,
    keep_largest_component,
    labels_from_probabilities,
    prediction_name,
    probabilities_name,
)
from .predictor import InferenceSettings, Predictor
from .runtime import available_bytes, cuda_has_bf16, resolve_device

__all__ = ["TorchBackend", "load_predictor", "predict_array", "predict_probabilities", "predict_files",
           "labels_from_probabilities", "keep_largest_component", "entropy", "collect_inputs", "prediction_name",
           "probabilities_name", "SINGLE_ORGANS"]


class TorchBackend:
    """A PyTorch network as a predictor's backend: numpy images in, numpy class scores out, computed
    on ``device`` in eval mode without gradients, in bf16 where ``precision`` asks for it."""

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "auto"):
        self.network, self.device = network, torch.device(device)
        inner = cast(ResUNet3D, getattr(network, "module", network))  # a DistributedDataParallel wrapper holds it
        config = inner.config
        self.divisor = 2 ** (config.depth - 1)
        self.base_channels = config.base_channels
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and cuda_has_bf16() else "fp32"
        self.precision = precision

    def __call__(self, x: np.ndarray) -> np.ndarray:
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.precision == "bf16"):
                y = self.network(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
        finally:
            self.network.train(was_training)
        return y.float().cpu().numpy()

    def free_bytes(self) -> int:
        return available_bytes(self.device)


def load_predictor(checkpoint: str | os.PathLike, device: str | torch.device = "auto",
                   settings: InferenceSettings | None = None) -> Predictor:
    """The network of ``checkpoint`` on ``device`` (``"auto"``: the GPU if there is one) as a
    :class:`~hipseg_lib.predictor.Predictor` with the checkpoint's preprocessing; a network trained on
    patches predicts in windows of its patch size.

    Example:
        >>> p = load_predictor("model/new_model.pth", settings=InferenceSettings(tta=False))  # doctest: +SKIP
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    loaded = load_model(checkpoint, dev, expect_classes=NUM_CLASSES)
    settings = settings or InferenceSettings()
    if loaded.window and settings.window is None:
        settings = dataclasses.replace(settings, window=loaded.window)
    return Predictor(TorchBackend(loaded.network, dev, settings.precision), loaded.preprocessing, settings)


def _deprecated(old: str) -> None:
    warnings.warn(f"{old} is deprecated and goes in the next release: use hipseg_lib.predict.load_predictor "
                  "(a Predictor) instead", DeprecationWarning, stacklevel=3)


def _predictor(model, preprocessing, device="cpu", memory_bytes=None, tta=None, postprocess=None,
               window=None) -> Predictor:
    settings = InferenceSettings(**{k: v for k, v in dict(tta=tta, postprocess=postprocess, window=window,
                                                          memory_bytes=memory_bytes).items() if v is not None},
                                 precision="fp32")
    return Predictor(TorchBackend(model, device, "fp32"), preprocessing, settings)


def predict_probabilities(model, image, affine, preprocessing, *args, **kwargs) -> np.ndarray:
    """Deprecated: ``load_predictor(...).probabilities(image, affine)``."""
    _deprecated("predict_probabilities")
    return _predictor(model, preprocessing, *args, **kwargs).probabilities(image, affine)


def predict_array(model, image, affine, preprocessing, *args, return_probabilities: bool = False, **kwargs):
    """Deprecated: ``load_predictor(...).labels(image, affine)``."""
    _deprecated("predict_array")
    predictor = _predictor(model, preprocessing, *args, **kwargs)
    probs = predictor.probabilities(image, affine)
    label = labels_from_probabilities(probs, predictor.settings.postprocess)
    return (label, probs) if return_probabilities else label


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  device: str = "auto", **options) -> list[Path]:
    """Deprecated: ``load_predictor(checkpoint, device, settings).predict_files(inputs, out_dir)``."""
    _deprecated("predict_files")
    write = {k: options.pop(k) for k in ("overwrite", "progress", "probabilities") if k in options}
    return load_predictor(checkpoint, device, InferenceSettings(**options)).predict_files(inputs, out_dir, **write)
