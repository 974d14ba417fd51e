"""Faster CPU kernels for a built network's convolutions, applied from outside its definition.

The network (:mod:`~hipseg_lib.model`) is written with plain ``torch.nn.Conv3d``, as a textbook
would write it. On a CPU, PyTorch picks two kernels for those layers that are slower than they
need to be; :func:`use_cpu_kernels` swaps :class:`CPUConv3d` in for every ``nn.Conv3d`` of a built
network. The layers keep their parameters, their checkpoint keys and their results; only the
kernel that computes them changes. Training and prediction call it; exported graphs (ONNX) and
GPU runs use PyTorch's own kernels.

What each choice measured on which CPU: ``benchmarks/results/HISTORY.md``; ``bench_step.py
--kernels-only`` measures both again.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CPUConv3d", "use_cpu_kernels", "use_torch_kernels"]

# PyTorch runs a fp32 CPU convolution of one volume in its own slow_conv3d kernel, not oneDNN's,
# when N * C * D * H is at most this (its "for some case, native is faster" rule in Convolution.cpp).
_NATIVE_BELOW = 20480


class CPUConv3d(nn.Conv3d):
    """``nn.Conv3d`` with two kernel choices that PyTorch does not make by itself on a CPU.

    - a 1x1x1 convolution is a matrix product over the channels, one per volume, where PyTorch
      would call oneDNN's general convolution kernel.
    - a fp32 convolution of a single volume at the deep levels runs in oneDNN. PyTorch sends
      it to its native ``slow_conv3d`` whenever N * C * D * H <= 20480, a slower kernel there.
      Handing oneDNN the input as one of its own tensors (``to_mkldnn``) makes PyTorch keep its
      kernel, backward pass included.

    Anywhere else (a GPU, tracing for export, compilation) it is ``nn.Conv3d``.

    Example:
        >>> conv = use_cpu_kernels(nn.Conv3d(4, 2, 1))
        >>> x = torch.randn(1, 4, 3, 3, 3)
        >>> torch.allclose(conv(x), F.conv3d(x, conv.weight, conv.bias), atol=1e-6)
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.onnx.is_in_onnx_export()):
            # exported graphs hold a plain convolution (hipseg export)
            return super().forward(x)
        if self._pointwise(x):  # a 1x1x1 convolution is a matrix product
            n, c = x.shape[:2]
            w = self.weight.view(self.out_channels, c)
            # one 2D product per volume (a batched one that broadcast the
            # weight was slower)
            y = torch.stack([w @ v.reshape(c, -1) for v in x])
            y = y.view(n, self.out_channels, *x.shape[2:])
            if self.bias is not None:
                y = y + self.bias.to(y.dtype).view(1, -1, 1, 1, 1)
            return y
        if self._native_would_run(x):  # oneDNN's kernel instead
            return F.conv3d(x.to_mkldnn(), self.weight, self.bias, self.stride,
                            self.padding, self.dilation, self.groups).to_dense()
        return super().forward(x)

    def _pointwise(self, x: torch.Tensor) -> bool:
        return bool(x.device.type == "cpu" and x.dim() == 5 and self.kernel_size == (1, 1, 1)
                    and self.stride == (1, 1, 1) and self.padding == (0, 0, 0) and self.groups == 1)

    def _native_would_run(self, x: torch.Tensor) -> bool:
        # PyTorch's rule sends strided convolutions to oneDNN already; a 4D input is unbatched
        return bool(self.stride == (1, 1, 1) and x.device.type == "cpu" and x.dtype == torch.float32
                and x.dim() == 5 and x.shape[0] == 1
                and x.shape[1] * x.shape[2] * x.shape[3] <= _NATIVE_BELOW and x.is_contiguous()
                and self.padding_mode == "zeros" and not torch.is_autocast_enabled("cpu")
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not torch.compiler.is_compiling())


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Compute every ``nn.Conv3d`` of ``model`` with :class:`CPUConv3d`, in
    place; returns ``model``.

    The layers stay the same objects with the same parameters (only their
    class changes), so the state dict, an optimiser that holds the parameters
    and a checkpoint are unaffected.
    """
    for m in model.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = CPUConv3d
    return model


def use_torch_kernels(model: nn.Module) -> nn.Module:
    """Undo :func:`use_cpu_kernels`: every :class:`CPUConv3d` becomes ``nn.Conv3d`` again."""
    for m in model.modules():
        if type(m) is CPUConv3d:
            m.__class__ = nn.Conv3d  # type: ignore[assignment]  # a class swap is the point
    return model
