"""The residual 3D U-Net (ResU-Net) of the seed, after Isensee et al. (2017).

Building blocks first (:class:`ResidualBlock`, :class:`DownConv`, :class:`ConvBlock`,
:class:`UpBlock`), then the network assembled from them (:class:`ResUNet3D`). Every block is 3D
and pre-activation: instance norm and leaky ReLU come before each convolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import NUM_CLASSES, SettingsError

__all__ = ["ModelConfig", "ResidualBlock", "DownConv", "ConvBlock", "UpBlock", "ResUNet3D", "count_parameters",
           "layer_table", "activation_bytes", "saved_tensor_bytes"]


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (norm, act, 3x3x3 conv) x 2 with
    dropout, plus a shortcut.

    The shortcut is the identity when channels match, else a 1x1x1
    convolution.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dropout: dropout probability between the two convolutions.

    Example:
        >>> ResidualBlock(16, 32)(torch.zeros(1, 16, 8, 8, 8)).shape
        torch.Size([1, 32, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        c_in, c_out = in_channels, out_channels
        self.norm1, self.act1 = _norm(c_in), _act()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2, self.act2 = _norm(c_out), _act()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out:  # a 1x1x1 convolution matches the channels
            self.shortcut = nn.Conv3d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # norm, activation, 3x3x3 conv; then again, with dropout before it
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.drop(self.act2(self.norm2(h))))
        return h + self.shortcut(x)  # the residual: add the input back


class DownConv(nn.Module):
    """Pre-activation stride-2 3x3x3 convolution: halves every spatial size (Isensee et al. 2017)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm, self.act = _norm(in_channels), _act()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class ConvBlock(nn.Module):
    """Pre-activation convolution (norm, act, conv): a light stage in place
    of a residual block.

    ``kernel_size=1`` mixes channels voxel by voxel (a full-resolution
    decoder stage with ``top_kernel=1``: the spatial context comes from the
    levels below).
    """

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int = 3):
        super().__init__()
        self.norm, self.act = _norm(in_channels), _act()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size,
                              padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class UpBlock(nn.Module):
    """Transposed-convolution upsampling, concatenation with the skip, then a residual block
    (or, when ``light``, a single pre-activation convolution of ``kernel_size``; with
    ``kernel_size=0`` none: the block returns the concatenation, ``out_channels + skip_channels``
    channels)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float = 0.0,
                 light: bool = False, kernel_size: int = 3):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block: nn.Module
        if not light:
            self.block = ResidualBlock(out_channels + skip_channels, out_channels, dropout)
        elif kernel_size:
            self.block = ConvBlock(out_channels + skip_channels, out_channels, kernel_size)
        else:
            self.block = nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # double the grid, halve the channels
        h = torch.cat([h, skip], dim=1)  # the encoder's map of this level
        return self.block(h)  # mix the two



@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings, stored in every checkpoint.

    Args:
        in_channels: image channels (1 for T2 MR).
        num_classes: output classes (6 for HipMRI).
        base_channels: channels at full resolution; doubled at each level.
        depth: number of resolution levels (``depth - 1`` downsamplings).
        dropout: dropout in residual blocks.
        deep_supervision: add upsampled segmentation outputs of coarser decoder levels to the
            final output (Isensee et al. 2017's sum of segmentation layers; nnU-Net's deep
            supervision instead gives every scale its own loss).
        downsample: ``"conv"``: stride-2 3x3x3 convolutions (Isensee et al. 2017); ``"maxpool"``:
            2x2x2 max pooling (the seed).
        light_levels: how many of the finest levels are light: one pre-activation convolution
            instead of a residual block on each side (on the encoder side of the full-resolution
            level, the stem alone). Each level has 8 times the voxels of the next, so the finest
            levels are where the compute goes; the residual blocks start below them. 0 is the
            seed's design.
        top_kernel: kernel of the full-resolution decoder convolution when that level is light:
            3; 1 to mix the upsampled features with the skip voxel by voxel; 0 for no convolution
            there: the final norm and the 1x1x1 head read the concatenation of the upsampled
            features and the skip (twice ``base_channels``), so the head does that mixing.

    Example:
        >>> ModelConfig(base_channels=12, depth=5).divisor
        16
    """

    in_channels: int = 1
    num_classes: int = NUM_CLASSES
    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.0
    deep_supervision: bool = False
    downsample: str = "conv"
    light_levels: int = 1
    top_kernel: int = 3

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise SettingsError(f"depth must be >= 2, got {self.depth}")
        if self.base_channels < 1 or self.in_channels < 1 or self.num_classes < 2:
            raise SettingsError("base_channels and in_channels must be >= 1 and num_classes >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.downsample not in ("conv", "maxpool"):
            raise SettingsError(f"downsample must be 'conv' or 'maxpool', got {self.downsample!r}")
        if not 0 <= self.light_levels < self.depth:
            raise SettingsError(f"light_levels must be in [0, depth - 1 = {self.depth - 1}], got {self.light_levels} "
                             "(fewer levels need fewer light levels too)")
        if self.top_kernel not in (0, 1, 3):
            raise SettingsError(f"top_kernel must be 0, 1 or 3, got {self.top_kernel}")
        if self.top_kernel != 3 and not self.light_levels:
            raise SettingsError(f"top_kernel={self.top_kernel} needs a light full-resolution level (light_levels >= 1)")

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        """Plain JSON values: what a checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict` (a checkpoint stores every setting)."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"unknown network settings: {', '.join(sorted(unknown))}")
        return cls(**d)


class ResUNet3D(nn.Module):
    """Residual 3D U-Net: residual encoder, downsampling (stride-2 convolutions or max pooling),
    residual bottleneck, transposed-convolution decoder with skip concatenation, 1x1x1 head.

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
            raise SettingsError("pass either a ModelConfig or keyword "
                                "arguments, not both")
        c = self.config = config
        # channels per level: doubled each time the grid is halved
        widths = [c.base_channels * 2 ** i for i in range(c.depth)]
        self.stem = nn.Conv3d(c.in_channels, widths[0], 3, padding=1,
                              bias=False)
        # Level i >= 1 starts by halving the grid: a stride-2 convolution
        # that doubles the channels too, or (the seed's way) max pooling,
        # after which the level's block doubles them.
        pooled = c.downsample == "maxpool"
        self.down = nn.ModuleList([
            nn.MaxPool3d(2) if pooled else DownConv(widths[i - 1], widths[i])
            for i in range(1, c.depth)])
        entering = [widths[i - 1] if pooled and i else widths[i]
                    for i in range(c.depth)]
        self.encoder = nn.ModuleList([
            self._encoder_block(i, entering[i], widths[i])
            for i in range(c.depth - 1)])
        self.bottleneck = nn.Sequential(
            ResidualBlock(entering[-1], widths[-1], c.dropout),
            ResidualBlock(widths[-1], widths[-1], c.dropout))
        # The decoder runs from the coarsest level up: decoder[0]
        # upsamples the bottleneck.
        self.decoder = nn.ModuleList([
            UpBlock(widths[i + 1], widths[i], widths[i], c.dropout,
                    light=i < c.light_levels,
                    kernel_size=c.top_kernel if i == 0 else 3)
            for i in reversed(range(c.depth - 1))])
        # no top convolution: the head reads the concatenation
        top = widths[0] if c.top_kernel else 2 * widths[0]
        self.final_norm = nn.Sequential(_norm(top), _act())
        self.head = nn.Conv3d(top, c.num_classes, 1)
        # Summed heads: 1x1x1 segmentation layers on the coarser decoder
        # levels, coarsest first.
        self.aux_heads = nn.ModuleList([
            nn.Conv3d(widths[i], c.num_classes, 1)
            for i in reversed(range(1, c.depth - 1))
        ]) if c.deep_supervision else None

    def _encoder_block(self, level: int, in_channels: int,
                       out_channels: int) -> nn.Module:
        """A residual block; at a light level one convolution (at full
        resolution none: the stem)."""
        if level >= self.config.light_levels:
            return ResidualBlock(in_channels, out_channels,
                                 self.config.dropout)
        if level == 0:
            return nn.Identity()
        return ConvBlock(in_channels, out_channels)

    @property
    def divisor(self) -> int:
        """Every spatial size of the input must be a multiple of this."""
        return self.config.divisor

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for an input this network cannot take."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (N, {self.config.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.divisor]
        if bad:
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by {self.divisor} "
                             f"(depth {self.config.depth} halves it {self.config.depth - 1} times); "
                             f"resize or pad to multiples of {self.divisor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # Encoder: each level's output is kept for the skip connection.
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                h = self.down[i - 1](h)  # halve the grid
            h = block(h)
            skips.append(h)
        # Bottleneck: the coarsest grid, each voxel sees the most context.
        h = self.bottleneck(self.down[-1](h))
        # Decoder: upsample, concatenate the skip, mix; the coarse heads'
        # scores are summed on the way (deep supervision).
        deep = None
        for j, up in enumerate(self.decoder):
            h = up(h, skips[-1 - j])
            if self.aux_heads is not None and j < len(self.aux_heads):
                scores = self.aux_heads[j](h)
                if deep is not None:
                    scores = scores + _upsample(deep, scores)
                deep = scores
        out = self.head(self.final_norm(h))  # one score per class and voxel
        if deep is not None:
            out = out + _upsample(deep, out)  # the coarse scores join in
        return out


def _upsample(scores: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``scores`` resized (trilinear) to the grid of ``like``."""
    return F.interpolate(scores, size=like.shape[2:], mode="trilinear", align_corners=False)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_table(model: ResUNet3D, input_shape: tuple[int, int, int]) -> list[dict]:
    """One row per top-level stage: name, type, output shape, parameters, activation MB.

    Runs one forward pass on zeros of ``(1, in_channels, *input_shape)`` with hooks.
    """
    rows: list[dict] = []
    named = [("stem", model.stem), ("encoder.0", model.encoder[0])]
    for i in range(1, len(model.encoder)):
        named += [(f"down.{i - 1}", model.down[i - 1]), (f"encoder.{i}", model.encoder[i])]
    named += [(f"down.{len(model.down) - 1}", model.down[-1]), ("bottleneck", model.bottleneck)]
    named += [(f"decoder.{i}", m) for i, m in enumerate(model.decoder)]
    named += [("head", model.head)]
    named += [(f"aux_head.{i}", h) for i, h in enumerate(model.aux_heads or [])]  # deep supervision
    hooks = []
    for name, module in named:
        def hook(mod, inp, out, name=name):
            rows.append({"layer": name, "type": type(mod).__name__,
                         "output shape": tuple(out.shape[1:]),
                         "parameters": count_parameters(mod),
                         "activation MB": out.numel() * out.element_size() / 2**20})
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, model.config.in_channels, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)  # the caller's mode, as it was
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


def saved_tensor_bytes(config: ModelConfig, input_shape: tuple[int, int, int], batch_size: int = 1,
                       dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one training forward pass,
    counted by PyTorch itself (``torch.autograd.graph.saved_tensors_hooks``) with the network and
    its input in ``dtype`` on the ``meta`` device: no memory is used, so the ``full`` preset's
    grid can be checked on any CPU. Each tensor counts once, however many operations save it;
    the weights, which the optimiser's memory accounts for, do not count.

    Example:
        >>> saved_tensor_bytes(ModelConfig(base_channels=4, depth=3), (16, 16, 8)) > 0
        True
    """
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
