"""The residual 3D U-Net of the seed project.

The building blocks first (:class:`ResidualBlock`, :class:`Downsample`,
:class:`UpBlock`), then the network assembled from them
(:class:`ResUNet3D`). Every block is pre-activation: an instance norm and a
leaky ReLU come before each convolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from . import NUM_CLASSES, SettingsError

__all__ = ["ModelConfig", "ResidualBlock", "Downsample", "UpBlock",
           "ResUNet3D", "count_parameters", "norm_act"]


def norm_act(channels: int) -> nn.Sequential:
    """Instance norm, then leaky ReLU: what comes before every convolution."""
    return nn.Sequential(nn.InstanceNorm3d(channels, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (norm, act, 3x3x3 conv) twice, plus a
    shortcut: the identity when the channels match, else a 1x1x1 conv.

    Example:
        >>> ResidualBlock(16, 32)(torch.zeros(1, 16, 8, 8, 8)).shape
        torch.Size([1, 32, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        self.pre1 = norm_act(in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1,
                               bias=False)
        self.pre2 = norm_act(out_channels)
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1,
                               bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:  # a 1x1x1 conv matches the channels
            self.shortcut = nn.Conv3d(in_channels, out_channels, 1,
                                      bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.pre1(x))
        h = self.conv2(self.drop(self.pre2(h)))
        return h + self.shortcut(x)  # the residual: add the input back


class Downsample(nn.Module):
    """Halve every spatial size: 2x2x2 max pooling (the seed's), or a
    pre-activation stride-2 3x3x3 conv that also sets the channels
    (Isensee et al. 2017, nnU-Net)."""

    def __init__(self, in_channels: int, out_channels: int, kind: str):
        super().__init__()
        self.op: nn.Module
        if kind == "maxpool":  # channels change in the next block
            self.op = nn.MaxPool3d(2)
            self.out_channels = in_channels
        else:
            self.op = nn.Sequential(
                norm_act(in_channels),
                nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1,
                          bias=False))
            self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class UpBlock(nn.Module):
    """One decoder level: a 2x2x2 transposed conv doubles the grid, the
    encoder's map of that level (the skip) is concatenated, and one
    pre-activation 3x3x3 conv mixes the two."""

    def __init__(self, in_channels: int, skip_channels: int,
                 out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2)
        self.pre = norm_act(out_channels + skip_channels)
        self.conv = nn.Conv3d(out_channels + skip_channels, out_channels, 3,
                              padding=1, bias=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = self.up(x)                   # double the grid
        h = torch.cat([h, skip], dim=1)  # beside the encoder's map
        return self.conv(self.pre(h))    # mix the two


@dataclass(frozen=True)
class ModelConfig:
    """The network's settings, stored in every checkpoint.

    Args:
        in_channels: image channels (1 for T2 MR).
        num_classes: output classes (6 for HipMRI).
        base_channels: channels at full resolution; doubled at each level.
        depth: resolution levels (``depth - 1`` halvings of the grid).
        dropout: channel dropout inside the residual blocks.
        deep_supervision: in training, also return the scores of the
            coarser decoder levels, each to get a loss of its own
            (:class:`~hipseg_lib.loss.DeepSupervisionLoss`, as nnU-Net).
        downsample: ``"maxpool"`` (the seed's) or ``"conv"`` (stride 2).

    Example:
        >>> ModelConfig(base_channels=12, depth=5).divisor
        16
    """

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.0
    deep_supervision: bool = True
    downsample: str = "maxpool"

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise SettingsError(f"depth must be >= 2, got {self.depth}")
        if min(self.base_channels, self.in_channels) < 1 \
                or self.num_classes < 2:
            raise SettingsError("base_channels and in_channels must be >= 1 "
                                "and num_classes >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"dropout must be in [0, 1), "
                                f"got {self.dropout}")
        if self.downsample not in ("maxpool", "conv"):
            raise SettingsError(f"downsample must be 'maxpool' or 'conv', "
                                f"got {self.downsample!r}")

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"unknown network settings: "
                                f"{', '.join(sorted(unknown))}")
        return cls(**d)


class ResUNet3D(nn.Module):
    """Residual 3D U-Net: a residual block at every encoder level and in the
    bottleneck, transposed-conv upsampling, concatenated skips and a 1x1x1
    head on every decoder level.

    Input ``(N, in_channels, X, Y, Z)``, each size a multiple of
    ``divisor``. Output: the logits ``(N, num_classes, X, Y, Z)``; in
    training with ``deep_supervision``, a list of logits, full resolution
    first, then each coarser decoder level's.

    Example:
        >>> net = ResUNet3D(ModelConfig(base_channels=8, depth=3)).eval()
        >>> net(torch.zeros(1, 1, 32, 32, 16)).shape
        torch.Size([1, 6, 32, 32, 16])
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        # channels per level: doubled each time the grid is halved
        widths = [c.base_channels * 2 ** i for i in range(c.depth)]
        self.stem = nn.Conv3d(c.in_channels, widths[0], 3, padding=1,
                              bias=False)
        self.encoder = nn.ModuleList()
        self.down = nn.ModuleList()
        channels = widths[0]
        for i in range(c.depth - 1):  # every level above the bottleneck
            self.encoder.append(ResidualBlock(channels, widths[i], c.dropout))
            self.down.append(Downsample(widths[i], widths[i + 1],
                                        c.downsample))
            channels = self.down[-1].out_channels
        self.bottleneck = ResidualBlock(channels, widths[-1], c.dropout)
        # decoder[0] upsamples the bottleneck; the last one reaches level 0
        self.decoder = nn.ModuleList([
            UpBlock(widths[i + 1], widths[i], widths[i])
            for i in reversed(range(c.depth - 1))])
        # heads[0] reads the full-resolution level; with deep supervision
        # every coarser decoder level has one too
        n_heads = c.depth - 1 if c.deep_supervision else 1
        self.heads = nn.ModuleList([
            nn.Sequential(norm_act(widths[i]),
                          nn.Conv3d(widths[i], c.num_classes, 1))
            for i in range(n_heads)])

    @property
    def divisor(self) -> int:
        return self.config.divisor

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for an input this network cannot take."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (N, {self.config.in_channels}, "
                             f"X, Y, Z), got {tuple(x.shape)}")
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by "
                f"{self.divisor} (depth {self.config.depth} halves it "
                f"{self.config.depth - 1} times); resize or pad to multiples "
                f"of {self.divisor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        h = self.stem(x)
        skips = []
        for block, down in zip(self.encoder, self.down):
            h = block(h)      # a residual block at this level
            skips.append(h)   # kept for the decoder
            h = down(h)       # halve the grid
        h = self.bottleneck(h)  # the coarsest grid: the widest context
        levels = []
        for up, skip in zip(self.decoder, reversed(skips)):
            h = up(h, skip)   # back up one level, with its skip
            levels.append(h)
        levels.reverse()      # full resolution first
        if self.training and self.config.deep_supervision:
            return [head(h) for head, h in zip(self.heads, levels)]
        return self.heads[0](levels[0])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
