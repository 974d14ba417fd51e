"""Planning a run before it runs: the FLOPs of a training step, the time they take at an assumed
share of a GPU's peak (MFU), and the augmented volumes per second a GPU then needs.

FLOPs are counted by PyTorch (``torch.utils.flop_counter.FlopCounterMode``) on the ``meta`` device,
so no memory is used and no time spent: the ``full`` preset's step can be planned on any CPU.
"""
from __future__ import annotations

import math

import torch

__all__ = ["BF16_PEAK_TFLOPS", "PLANNING_MFU", "REAL_SET_TRAIN_VOLUMES", "REAL_SET_VAL_VOLUMES",
           "peak_tflops", "step_flops", "forward_flops", "RunPlan", "plan_run", "saved_tensor_bytes"]

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "RTX 4090": 165.0, "T4": 65.0}
# The share of an H100's bf16 peak the full preset is planned at: an assumption (a 3D U-Net with
# 16 channels at full resolution and instance norms is far from matrix-bound), until
# `make gpu-check` measures it.
PLANNING_MFU = 0.10
# The real HipMRI set: 211 volumes of 38 patients, split 80/10/10 by patient (about 169/21/21).
REAL_SET_TRAIN_VOLUMES = 169
REAL_SET_VAL_VOLUMES = 21


def peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak, by the longest key of :data:`BF16_PEAK_TFLOPS` in its name."""
    hits = [k for k in BF16_PEAK_TFLOPS if k.lower() in name.lower()]
    return BF16_PEAK_TFLOPS[max(hits, key=len)] if hits else None


def _meta_model_and_input(cfg, batch: int):
    from .model import ResUNet3D

    with torch.device("meta"):
        return ResUNet3D(cfg.model), torch.zeros(batch, cfg.model.in_channels, *cfg.preprocessing.target_shape)


def step_flops(cfg) -> float:
    """FLOPs of one training step of ``cfg`` (a ``TrainConfig``): forward and backward of a batch."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _meta_model_and_input(cfg, cfg.batch_size)
    with FlopCounterMode(display=False) as counter:
        outputs = model.train()(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        sum(o.float().sum() for o in outputs).backward()
    return float(counter.get_total_flops())


def forward_flops(cfg) -> float:
    """FLOPs of one forward pass of one volume (a validation or prediction)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _meta_model_and_input(cfg, 1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return float(counter.get_total_flops())


class RunPlan(dict):
    """What :func:`plan_run` returns: a dict of the plan's figures, printable as lines."""

    def lines(self) -> list[str]:
        return [f"{self['epochs']} epochs x {self['steps_per_epoch']} steps of {self['step_tflop']:.2f} TFLOP "
                f"({self['train_volumes']} training volumes, batch {self['batch_size']})",
                f"at {100 * self['mfu']:.0f} % of {self['peak_tflops']:.0f} TFLOP/s: {1000 * self['step_s']:.1f} ms "
                f"per step, {self['minutes']:.1f} min in all (validation included)",
                f"the GPU then needs {self['volumes_per_s']:.0f} augmented volumes per second"]


def plan_run(cfg, train_volumes: int = REAL_SET_TRAIN_VOLUMES, val_volumes: int = REAL_SET_VAL_VOLUMES,
             mfu: float = PLANNING_MFU, peak: float = BF16_PEAK_TFLOPS["H100 SXM"], world: int = 1) -> RunPlan:
    """How long ``cfg`` trains on one GPU (or ``world`` of them) by the FLOP count at ``mfu`` of ``peak``.

    The time is the training steps plus the validation forward passes (every ``val_every`` epochs,
    and at the end), all at the same ``mfu``: a plan, not a measurement.

    Example:
        >>> from hipseg_lib.config import make_config
        >>> plan = plan_run(make_config("full"))     # doctest: +SKIP
        >>> round(plan["minutes"])                   # doctest: +SKIP
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    flops = step_flops(cfg)
    rate = mfu * peak * 1e12
    steps = train_volumes // (cfg.batch_size * world)
    validations = cfg.epochs // cfg.val_every + (cfg.epochs % cfg.val_every != 0)
    step_s = flops / rate
    val_s = math.ceil(val_volumes / world) * forward_flops(cfg) / rate
    seconds = cfg.epochs * steps * step_s + validations * val_s
    return RunPlan(epochs=cfg.epochs, steps_per_epoch=steps, step_tflop=flops / 1e12, train_volumes=train_volumes,
                   batch_size=cfg.batch_size, mfu=mfu, peak_tflops=peak, step_s=step_s, minutes=seconds / 60,
                   volumes_per_s=cfg.batch_size / step_s)


def saved_tensor_bytes(config, input_shape: tuple[int, int, int], batch_size: int = 1,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one training forward pass (the
    bulk of training memory), counted by PyTorch itself (``saved_tensors_hooks``) with the network
    and its input in ``dtype`` on the ``meta`` device: no memory is used, so the ``full`` preset's
    grid can be checked on any CPU. Each tensor counts once; the weights do not count.

    Example:
        >>> from hipseg_lib.model import ModelConfig
        >>> saved_tensor_bytes(ModelConfig(base_channels=4, depth=3), (16, 16, 8)) > 0
        True
    """
    from .model import ResUNet3D

    with torch.device("meta"):
        model = ResUNet3D(config).to(dtype).train()
        x = torch.zeros(batch_size, config.in_channels, *input_shape, dtype=dtype)
    saved: dict[int, torch.Tensor] = {}
    weights = {id(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights:
            saved[id(t)] = t  # keeping a reference keeps the id unique
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(t.numel() * t.element_size() for t in saved.values())
