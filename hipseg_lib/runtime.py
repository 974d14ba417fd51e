"""Where and how the network runs: the device, the seeds and the precision,
the same for training and prediction."""
from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path

import numpy as np
import torch

from . import PRECISIONS, HipsegError, SettingsError

__all__ = ["resolve_device", "cuda_unusable_reason", "seed_everything",
           "cpu_has_bf16",
           "cuda_has_bf16", "PRECISIONS", "resolve_precision", "autocast",
           "precision_name", "memory_layout"]


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's CUDA device where there is one, else the
    CPU.

    Raises:
        HipsegError: a CUDA device was asked for and none can be used.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HipsegError(f"device {device!r} asked for, but "
                          f"{cuda_unusable_reason()}")
    return dev


def cuda_unusable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, in a few words."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA (a CPU-only build)"
    if torch.cuda.device_count() == 0:
        return ("no CUDA GPU is visible (none, no driver, or "
                "CUDA_VISIBLE_DEVICES hides them)")
    return ("CUDA cannot be started here (a driver older than this torch "
            f"build's CUDA {torch.version.cuda}?)")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cuda_has_bf16() -> bool:
    """Whether the GPU computes bf16 natively (Ampere and newer)."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) that keep native bf16
_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16",
              "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
              "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
              "AVX10_2_512_AMX_2")
# the CPU flags (Linux's /proc/cpuinfo) of native bf16: x86's and Arm's
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.lru_cache(maxsize=1)  # read once: a CPU's flags do not change
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (none known elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _onednn_runs_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX).

    oneDNN also runs bf16 on older AVX-512 CPUs (Skylake, Cascade Lake) by
    emulating it; that does not count: it is no faster than fp32 there,
    and it has turned a network's loss into NaN. An instruction-set cap
    (``ONEDNN_MAX_CPU_ISA=AVX2``, say) below AVX512_CORE_BF16 counts as no
    bf16, so that a bf16 machine can stand in for an older one.

    Example:
        >>> cpu_has_bf16() in (True, False)
        True
    """
    if not _onednn_runs_bf16():
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get(
        "DNNL_MAX_CPU_ISA")
    if cap and cap.strip().upper() not in _BF16_ISAS:
        return False
    return bool(_cpu_flags() & _BF16_FLAGS)


def resolve_precision(device: torch.device,
                      precision: str = "auto") -> torch.dtype | None:
    """The 16-bit type to compute in, or None for fp32. ``"auto"``: bf16
    where the device computes it natively (a recent GPU or CPU), fp16 on an
    older GPU, fp32 on any other CPU.

    Example:
        >>> resolve_precision(torch.device("cpu"), "fp32") is None
        True
    """
    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of "
                            f"{', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if cuda_has_bf16() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    types = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    return types[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
    return names[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The context that computes in ``dtype`` on ``device`` (none: fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_layout(device: torch.device,
                  dtype: torch.dtype | None) -> torch.memory_format:
    """How the network's weights and inputs lie in memory. In fp32 on a CPU,
    channels last: oneDNN then computes every convolution, where PyTorch
    would send the small deep-level ones to a slower kernel of its own
    (``benchmarks/bench_step.py`` times both). Elsewhere PyTorch's default."""
    if device.type == "cpu" and dtype is None:
        return torch.channels_last_3d
    return torch.contiguous_format
