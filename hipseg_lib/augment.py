"""Augmentation in torch, where the network trains, a whole batch at a time.

A random transform only *samples* parameters and returns the deterministic
transform that applies them (:meth:`RandomAugmentation.sample` gives an
:class:`Augmentation`), so every augmentation can be replayed and tested. The
set and its order are nnU-Net's: rotation and scaling as one resampling, noise,
blur, brightness, contrast, simulated low resolution, gamma, mirroring.

An image is ``(C, X, Y, Z)`` float and a label ``(X, Y, Z)`` integer; a batch
adds a leading ``N``. Axis numbers count the spatial axes 0, 1, 2.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import SettingsError

__all__ = ["Mirror", "Affine", "rotation_matrix", "GaussianNoise",
           "GaussianBlur", "Brightness", "Contrast", "LowResolution", "Gamma",
           "Augmentation", "augment_batch", "RandomAugmentation",
           "AUGMENTATIONS", "augmentation_named", "mirrored_axes", "Crop",
           "RandomPatch"]

Pair = tuple[torch.Tensor, torch.Tensor]
# Slices this many times thicker than the in-plane voxels get in-plane
# rotation only (nnU-Net applies its threshold of 3 to the patch shape)
ANISO_THRESHOLD = 3.0


@dataclass(frozen=True)
class Mirror:
    """Mirror image and label along the given spatial axes."""

    axes: tuple[int, ...] = ()

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        if not self.axes:
            return image, label
        return (torch.flip(image, [1 + a for a in self.axes]),
                torch.flip(label, list(self.axes)))


def rotation_matrix(angles: Sequence[float], scale: float = 1.0) -> np.ndarray:
    """``Rz @ Ry @ Rx * scale``: rotations (radians) about axes 0, 1 and 2."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)],
                   [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0],
                   [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0],
                   [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx * scale


@dataclass(frozen=True)
class Affine:
    """Rotation and scaling about the volume's centre, as one resampling.

    ``matrix`` is in millimetres: the output at a point ``p`` (mm from the
    centre) is the input at ``matrix @ p``, so that a rotation turns the
    anatomy, not the voxels, on a grid whose voxels are not cubes.
    """

    matrix: tuple[tuple[float, ...], ...]
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def rotation(cls, angles, scale=1.0, spacing=(1.0, 1.0, 1.0)) -> Affine:
        m = rotation_matrix(angles, scale)
        return cls(tuple(tuple(float(v) for v in row) for row in m),
                   tuple(float(s) for s in spacing))

    def theta(self, shape: Sequence[int]) -> torch.Tensor:
        """The ``(3, 4)`` matrix ``F.affine_grid`` takes for a grid of
        ``shape``. It works in coordinates from -1 to 1 along each axis,
        listed (Z, Y, X): millimetres are ``n * N / 2 * spacing`` of them."""
        d = np.diag([n / 2 * s for n, s in zip(shape, self.spacing)])
        m = np.linalg.inv(d) @ np.asarray(self.matrix) @ d
        m = m[::-1, ::-1]  # (X, Y, Z) to grid_sample's (Z, Y, X)
        return torch.from_numpy(np.hstack([m, np.zeros((3, 1))])).float()

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        images, labels = resample(image[None], label[None], [self])
        return images[0], labels[0]


def resample(images: torch.Tensor, labels: torch.Tensor,
             affines: Sequence[Affine]) -> Pair:
    """One ``grid_sample`` over a batch, each sample with its own matrix:
    the image trilinear (padded with its minimum, the background of a
    z-scored scan), the label at the nearest voxel, so it stays a label."""
    shape = images.shape[2:]
    theta = torch.stack([a.theta(shape) for a in affines])
    grid = F.affine_grid(theta.to(images.device),
                         [len(affines), 1, *shape], align_corners=False)
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    out = F.grid_sample(images - low, grid, mode="bilinear",
                        align_corners=False) + low
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest",
                        align_corners=False)
    return out, lab[:, 0].to(labels.dtype)


@dataclass(frozen=True)
class GaussianNoise:
    """Add noise of standard deviation ``std``; ``seed`` makes it replay."""

    std: float
    seed: int

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        g = torch.Generator(device=image.device).manual_seed(self.seed)
        noise = torch.randn(image.shape, generator=g, device=image.device)
        return image + self.std * noise, label


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A 1D Gaussian of ``sigma`` voxels, cut at 3 sigma, summing to one."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur of ``sigma`` voxels along each axis: one 1D convolution
    per axis (a 3D Gaussian is separable), edges replicated."""

    sigma: tuple[float, float, float]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        x = image[:, None]  # (C, 1, X, Y, Z): every channel alike
        for axis, s in enumerate(self.sigma):
            if s <= 0:
                continue
            k = gaussian_kernel(s).to(x.device)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = len(k)  # the kernel lies along this axis
            pad = [0, 0, 0, 0, 0, 0]  # (Z, Z, Y, Y, X, X), as F.pad counts
            pad[4 - 2 * axis] = pad[5 - 2 * axis] = len(k) // 2
            x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
        return x[:, 0], label


@dataclass(frozen=True)
class Brightness:
    """Multiply every intensity by ``multiplier``."""

    multiplier: float

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        return image * self.multiplier, label


@dataclass(frozen=True)
class Contrast:
    """Stretch intensities about their mean by ``factor``, then clip them to
    the range they had."""

    factor: float

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        mean = image.mean()
        stretched = (image - mean) * self.factor + mean
        return stretched.clamp(image.min(), image.max()), label


@dataclass(frozen=True)
class LowResolution:
    """Simulate a coarser scan: nearest neighbour down to ``scale`` of the
    size, then linear back up."""

    scale: float

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        shape = list(image.shape[1:])
        small = [max(1, round(n * self.scale)) for n in shape]
        x = F.interpolate(image[None], size=small, mode="nearest-exact")
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
        return x[0], label


@dataclass(frozen=True)
class Gamma:
    """Gamma on the intensity range (``invert``: on the negated image), the
    mean and standard deviation kept."""

    gamma: float
    invert: bool = False

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        x = -image if self.invert else image
        mean, std = x.mean(), x.std()
        lo, span = x.min(), (x.max() - x.min()).clamp_min(1e-7)
        x = ((x - lo) / span) ** self.gamma * span + lo
        x = (x - x.mean()) * (std / x.std().clamp_min(1e-7)) + mean
        return -x if self.invert else x, label


@dataclass(frozen=True)
class Augmentation:
    """One sample's augmentation, in nnU-Net's order: the resampling, the
    intensity transforms, the mirroring. All defaults: the identity."""

    spatial: Affine | None = None
    intensity: tuple = ()
    mirror: Mirror = field(default_factory=Mirror)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        images, labels = augment_batch(image[None], label[None], [self])
        return images[0], labels[0]


def augment_batch(images: torch.Tensor, labels: torch.Tensor,
                  augmentations: Sequence[Augmentation]) -> Pair:
    """Apply ``augmentations[i]`` to sample ``i`` of a batch: the resampling
    (the costly part) once for all the samples that have one, the rest
    sample by sample."""
    if len(augmentations) != len(images):
        raise ValueError(f"{len(augmentations)} augmentations for a batch "
                         f"of {len(images)}")
    moved = [i for i, a in enumerate(augmentations) if a.spatial is not None]
    if moved:
        images, labels = images.clone(), labels.clone()
        images[moved], labels[moved] = resample(
            images[moved], labels[moved],
            [augmentations[i].spatial for i in moved])  # type: ignore[misc]
    out = []
    for aug, image, label in zip(augmentations, images, labels):
        for transform in aug.intensity:
            image, label = transform(image, label)
        out.append(aug.mirror(image, label))
    return (torch.stack([image for image, _ in out]),
            torch.stack([label for _, label in out]))


def _either_side_of_one(rng: np.random.Generator, lo: float, hi: float):
    """nnU-Net's way to draw a factor: below or above 1 with even odds, then
    uniform on that side."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


@dataclass(frozen=True)
class RandomAugmentation:
    """nnU-Net's training augmentation: each ``p_*`` is the chance that a
    sample gets that transform; ranges as nnU-Net v2 sets them."""

    p_rotation: float = 0.2
    max_rotation_degrees: float = 30.0
    max_inplane_rotation_degrees: float = 180.0  # thick slices: see below
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.1
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.125
    low_resolution: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    mirror_axes: tuple[int, ...] = (0,)  # left-right only: see the docs
    p_mirror: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise SettingsError(f"{f.name} must be in [0, 1], got {value}")
            if f.name != "mirror_axes" and isinstance(value, tuple) and not (
                    len(value) == 2 and 0 <= value[0] <= value[1] < math.inf):
                raise SettingsError(f"{f.name} must be a range (low, high) "
                                    f"with 0 <= low <= high, got {value}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise SettingsError(f"mirror_axes must be among 0, 1, 2, "
                                f"got {self.mirror_axes}")

    def rotation_angles(self, rng, spacing: Sequence[float]) -> list[float]:
        """Angles (radians) about axes 0, 1, 2: all three within
        ``max_rotation_degrees``, or, for thick slices (nnU-Net's rule), about
        the thick axis only (in-plane), within
        ``max_inplane_rotation_degrees``."""
        if max(spacing) / min(spacing) > ANISO_THRESHOLD:
            r = math.radians(self.max_inplane_rotation_degrees)
            angles = [0.0, 0.0, 0.0]
            angles[int(np.argmax(spacing))] = float(rng.uniform(-r, r))
            return angles
        r = math.radians(self.max_rotation_degrees)
        return [float(rng.uniform(-r, r)) for _ in range(3)]

    def sample(self, rng: np.random.Generator,
               spacing=(1.0, 1.0, 1.0)) -> Augmentation:
        """The :class:`Augmentation` one sample with voxels of ``spacing``
        (mm) gets, drawn from ``rng``."""
        rotate, scale = rng.random() < self.p_rotation, \
            rng.random() < self.p_scaling
        spatial = None
        if rotate or scale:
            angles = self.rotation_angles(rng, spacing) if rotate else [0] * 3
            s = float(rng.uniform(*self.scaling)) if scale else 1.0
            spatial = Affine.rotation(angles, s, spacing)
        intensity: list = []
        if rng.random() < self.p_noise:
            std = float(rng.uniform(*self.noise_std))
            intensity.append(GaussianNoise(std, int(rng.integers(2**62))))
        if rng.random() < self.p_blur:
            x, y, z = (float(rng.uniform(*self.blur_sigma)) for _ in range(3))
            intensity.append(GaussianBlur((x, y, z)))
        if rng.random() < self.p_brightness:
            factor = _either_side_of_one(rng, *self.brightness)
            intensity.append(Brightness(factor))
        if rng.random() < self.p_contrast:
            factor = _either_side_of_one(rng, *self.contrast)
            intensity.append(Contrast(factor))
        if rng.random() < self.p_low_resolution:
            scale_down = float(rng.uniform(*self.low_resolution))
            intensity.append(LowResolution(scale_down))
        if rng.random() < self.p_gamma_inverted:
            gamma = _either_side_of_one(rng, *self.gamma)
            intensity.append(Gamma(gamma, invert=True))
        if rng.random() < self.p_gamma:
            intensity.append(Gamma(_either_side_of_one(rng, *self.gamma)))
        axes = tuple(a for a in self.mirror_axes
                     if rng.random() < self.p_mirror)
        return Augmentation(spatial, tuple(intensity), Mirror(axes))


AUGMENTATIONS: dict[str, RandomAugmentation] = {
    # nnU-Net's set, chances and ranges: for long runs (the full preset)
    "nnunet": RandomAugmentation(),
    # only rotation (up to 10 degrees), brightness (0.9-1.1), gamma and
    # mirroring, each in 30 % of the samples or (mirroring) half: for the
    # cpu preset's short run, where nnU-Net's set cost validation Dice
    "light": RandomAugmentation(
        p_rotation=0.3, max_rotation_degrees=10.0,
        max_inplane_rotation_degrees=10.0, p_scaling=0.0,
        p_noise=0.0, p_blur=0.0, p_brightness=0.3, brightness=(0.9, 1.1),
        p_contrast=0.0, p_low_resolution=0.0, p_gamma_inverted=0.0,
        p_gamma=0.3, gamma=(0.74, 1.35)),
}


def augmentation_named(spec: str | dict) -> RandomAugmentation | None:
    """The augmentation a training setting names: a key of
    :data:`AUGMENTATIONS`, ``"none"`` (None), or a dict of settings changed
    from nnU-Net's (``{"p_rotation": 0.1}``)."""
    if isinstance(spec, dict):
        known = {f.name for f in dataclasses.fields(RandomAugmentation)}
        unknown = set(spec) - known
        if unknown:
            raise SettingsError(f"unknown augmentation settings: "
                                f"{', '.join(sorted(unknown))}")
        changes: dict = {k: tuple(v) if isinstance(v, list) else v
                         for k, v in spec.items()}
        return dataclasses.replace(AUGMENTATIONS["nnunet"], **changes)
    if spec == "none":
        return None
    if spec not in AUGMENTATIONS:
        raise SettingsError(f"augmentation must be one of "
                            f"{', '.join(AUGMENTATIONS)}, none or a dict of "
                            f"settings, got {spec!r}")
    return AUGMENTATIONS[spec]


def mirrored_axes(spec: str | dict) -> tuple[int, ...]:
    """The axes training with augmentation ``spec`` mirrors: the axes
    test-time mirroring uses for a network trained so."""
    aug = augmentation_named(spec)
    return aug.mirror_axes if aug else ()


@dataclass(frozen=True)
class Crop:
    """Cut a box of ``size`` from ``start``, padded (image: its minimum,
    label: background) where the box leaves the volume."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        out_i = image.new_full((image.shape[0], *self.size),
                               float(image.min()))
        out_l = label.new_zeros(self.size)
        src, dst = [], []
        for s, n, full in zip(self.start, self.size, label.shape):
            a, b = max(s, 0), min(s + n, full)  # the part inside the volume
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out_i[:, dst[0], dst[1], dst[2]] = image[:, src[0], src[1], src[2]]
        out_l[dst[0], dst[1], dst[2]] = label[src[0], src[1], src[2]]
        return out_i, out_l


@dataclass(frozen=True)
class RandomPatch:
    """A box of ``size`` for patch training. With chance
    ``foreground_fraction`` it is centred on a voxel of one organ present in
    the label (the organ drawn first, then the voxel: nnU-Net's
    oversampling, so that small organs are seen often); otherwise it is
    placed uniformly. A box larger than the volume is centred on it."""

    size: tuple[int, int, int]
    foreground_fraction: float = 0.0

    def sample(self, rng: np.random.Generator, label: torch.Tensor) -> Crop:
        shape, size = tuple(label.shape), tuple(int(s) for s in self.size)
        organs = [int(c) for c in torch.unique(label).tolist() if c > 0]
        if organs and rng.random() < self.foreground_fraction:
            organ = organs[int(rng.integers(len(organs)))]
            voxels = torch.nonzero(label == organ)
            centre = voxels[int(rng.integers(len(voxels)))].tolist()
            at = [int(np.clip(c - s // 2, min(0, n - s), max(0, n - s)))
                  for c, s, n in zip(centre, size, shape)]
        else:
            at = [int(rng.integers(0, n - s + 1)) if n >= s
                  else -((s - n) // 2) for n, s in zip(shape, size)]
        return Crop((at[0], at[1], at[2]), (size[0], size[1], size[2]))
