"""The residual 3D U-Net (ResU-Net) of the seed, after Isensee et al. (2017).

Building blocks first (:class:`ResidualBlock`, :class:`UpBlock`), then the network
assembled from them (:class:`ResUNet3D`). Blocks take their convolution, normalisation
and activation as arguments, so the same block serves 2D and 3D.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import NUM_CLASSES

__all__ = ["ModelConfig", "ResidualBlock", "UpBlock", "ResUNet3D", "count_parameters", "layer_table",
           "activation_bytes"]


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (norm, act, conv) x 2 with dropout, plus a shortcut.

    The shortcut is the identity when channels match, else a 1x1x1 convolution.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dropout: dropout probability between the two convolutions.
        conv: convolution class (``nn.Conv3d`` or ``nn.Conv2d``).
        norm: normalisation factory taking the channel count.
        act: activation factory.

    Example:
        >>> ResidualBlock(16, 32)(torch.zeros(1, 16, 8, 8, 8)).shape
        torch.Size([1, 32, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0,
                 conv: type[nn.Module] = nn.Conv3d,
                 norm: Callable[[int], nn.Module] = lambda c: nn.InstanceNorm3d(c, affine=True),
                 act: Callable[[], nn.Module] = lambda: nn.LeakyReLU(0.01, inplace=True)):
        super().__init__()
        self.norm1, self.act1 = norm(in_channels), act()
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2, self.act2 = norm(out_channels), act()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else conv(in_channels, out_channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.drop(self.act2(self.norm2(h))))
        return h + self.shortcut(x)


class UpBlock(nn.Module):
    """Transposed-convolution upsampling, concatenation with the skip, then a residual block."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = ResidualBlock(out_channels + skip_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings, stored in every checkpoint.

    Args:
        in_channels: image channels (1 for T2 MR).
        num_classes: output classes (6 for HipMRI).
        base_channels: channels at full resolution; doubled at each level.
        depth: number of resolution levels (``depth - 1`` poolings).
        dropout: dropout in residual blocks.
        deep_supervision: add upsampled segmentation outputs of coarser decoder levels to the
            final output (Isensee et al. 2017).
    """

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.0
    deep_supervision: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class ResUNet3D(nn.Module):
    """Residual 3D U-Net: residual encoder, max-pool downsampling, residual bottleneck,
    transposed-convolution decoder with skip concatenation, 1x1x1 head.

    Input ``(N, in_channels, X, Y, Z)`` with X, Y, Z divisible by ``2 ** (depth - 1)``;
    output logits ``(N, num_classes, X, Y, Z)``.

    Example:
        >>> net = ResUNet3D(ModelConfig(base_channels=8, depth=3))
        >>> net(torch.zeros(1, 1, 32, 32, 16)).shape
        torch.Size([1, 6, 32, 32, 16])
    """

    def __init__(self, config: ModelConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            raise ValueError("pass either a ModelConfig or keyword arguments, not both")
        c = config
        if c.depth < 2:
            raise ValueError(f"depth must be >= 2, got {c.depth}")
        if c.base_channels < 1 or c.in_channels < 1 or c.num_classes < 2:
            raise ValueError("base_channels and in_channels must be >= 1 and num_classes >= 2")
        if not 0.0 <= c.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")
        self.config = c
        widths = [c.base_channels * 2 ** i for i in range(c.depth)]
        self.stem = nn.Conv3d(c.in_channels, widths[0], 3, padding=1, bias=False)
        self.encoder = nn.ModuleList(
            [ResidualBlock(widths[0], widths[0], c.dropout)]
            + [ResidualBlock(widths[i - 1], widths[i], c.dropout) for i in range(1, c.depth - 1)]
        )
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = nn.Sequential(ResidualBlock(widths[-2], widths[-1], c.dropout),
                                        ResidualBlock(widths[-1], widths[-1], c.dropout))
        self.decoder = nn.ModuleList(
            [UpBlock(widths[i + 1], widths[i], widths[i], c.dropout) for i in reversed(range(c.depth - 1))]
        )
        self.final_norm = nn.Sequential(nn.InstanceNorm3d(widths[0], affine=True), nn.LeakyReLU(0.01, inplace=True))
        self.head = nn.Conv3d(widths[0], c.num_classes, 1)
        # Deep supervision: 1x1x1 segmentation layers on coarser decoder levels.
        self.aux_heads = nn.ModuleList(
            [nn.Conv3d(widths[i], c.num_classes, 1) for i in reversed(range(1, c.depth - 1))]
        ) if c.deep_supervision else None

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (self.config.depth - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for an input this network cannot take."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (N, {self.config.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by {self.divisor} "
                             f"(depth {self.config.depth} pools {self.config.depth - 1} times); "
                             f"resize or pad to multiples of {self.divisor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.encoder):
            h = block(h if i == 0 else self.pool(h))
            skips.append(h)
        h = self.bottleneck(self.pool(h))
        seg = None
        for j, up in enumerate(self.decoder):
            h = up(h, skips[-1 - j])
            if self.aux_heads is not None and j < len(self.aux_heads):
                s = self.aux_heads[j](h)
                seg = s if seg is None else s + F.interpolate(seg, size=s.shape[2:], mode="trilinear",
                                                              align_corners=False)
        out = self.head(self.final_norm(h))
        if seg is not None:
            out = out + F.interpolate(seg, size=out.shape[2:], mode="trilinear", align_corners=False)
        return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_table(model: ResUNet3D, input_shape: tuple[int, int, int]) -> list[dict]:
    """One row per top-level stage: name, type, output shape, parameters, activation MB.

    Runs one forward pass on zeros of ``(1, in_channels, *input_shape)`` with hooks.
    """
    rows: list[dict] = []
    named = [("stem", model.stem)]
    named += [(f"encoder.{i}", m) for i, m in enumerate(model.encoder)]
    named += [("bottleneck", model.bottleneck)]
    named += [(f"decoder.{i}", m) for i, m in enumerate(model.decoder)]
    named += [("head", model.head)]
    hooks = []
    for name, module in named:
        def hook(mod, inp, out, name=name):
            rows.append({"layer": name, "type": type(mod).__name__,
                         "output shape": tuple(out.shape[1:]),
                         "parameters": count_parameters(mod),
                         "activation MB": out.numel() * out.element_size() / 2**20})
        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, model.config.in_channels, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return rows


def activation_bytes(config: ModelConfig, input_shape: tuple[int, int, int], batch_size: int = 1,
                     bytes_per_value: int = 4) -> int:
    """Bytes of every layer output of one forward pass: roughly what autograd keeps for the
    backward pass, the bulk of training memory. Computed on the ``meta`` device, so it costs
    no memory and works for full-resolution inputs on any machine.
    """
    model = ResUNet3D(config).to("meta")
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * bytes_per_value

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(torch.zeros(batch_size, config.in_channels, *input_shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total
