"""Augmentation in torch, on the device where the network trains, a whole batch at a time.

Random transforms *sample* parameters; deterministic transforms *apply* them. A random
transform's :meth:`~RandomAugmentation.sample` returns the deterministic :class:`Augmentation` it
would apply, so every augmentation can be replayed and tested. Training draws sample ``i`` of
epoch ``e`` from ``np.random.default_rng([seed, e, i])``, in the process that trains, so the
result never depends on worker processes or on how many processes train.

The set is nnU-Net's default one (``nnUNetTrainer.get_training_transforms``, built from
``batchgeneratorsv2``), in nnU-Net's order: rotation about all three axes and scaling as **one**
resampling (``affine_grid`` + ``grid_sample``: image trilinear, label nearest, so a label stays a
label), Gaussian noise, Gaussian blur, brightness, contrast, simulated low resolution, gamma (of
the inverted image too), mirroring. Rotations are made in millimetres, so that a rotation of a
grid with unequal voxel sizes is still a rotation of the anatomy; when slices are over three times
thicker than the in-plane voxels, only in-plane rotation is used, as nnU-Net does.

Shapes: an image is ``(C, X, Y, Z)`` float, a label ``(X, Y, Z)`` integer; a batch adds a leading
``N``. Axis numbers (``Mirror``, ``mirror_axes``) count the spatial axes 0, 1, 2.

Example:
    >>> aug = RandomAugmentation()
    >>> t = aug.sample(np.random.default_rng(0), spacing=(1.8, 1.8, 2.0))  # an Augmentation
    >>> image2, label2 = t(image, label)                                   # doctest: +SKIP
    >>> images2, labels2 = augment_batch(images, labels, [t, t])           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import SettingsError

__all__ = [
    "Mirror", "Affine", "GaussianNoise", "GaussianBlur", "Brightness", "Contrast", "LowResolution", "Gamma",
    "Augmentation", "augment_batch", "RandomAugmentation", "Crop", "RandomPatch", "FLIP_AXES",
    "ANISO_THRESHOLD", "rotation_matrix", "AUGMENTATIONS", "augmentation_named",
]

Pair = tuple[torch.Tensor, torch.Tensor]

# The axes training mirrors, and so the ones test-time augmentation mirrors: left-right only.
# nnU-Net mirrors all three because it knows nothing of the anatomy; a pelvis is left-right
# symmetric, but never upside down or back to front in a scan.
FLIP_AXES: tuple[int, ...] = (0,)
# nnU-Net's rule: slices this many times thicker than the finest axis get in-plane rotation only.
ANISO_THRESHOLD = 3.0


# ---- deterministic transforms -------------------------------------------------------------
@dataclass(frozen=True)
class Mirror:
    """Mirror along the given spatial axes (exact: ``torch.flip``)."""

    axes: tuple[int, ...] = ()

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        if not self.axes:
            return image, label
        return torch.flip(image, [1 + a for a in self.axes]), torch.flip(label, list(self.axes))


def rotation_matrix(angles: Sequence[float], scale: float = 1.0) -> np.ndarray:
    """``Rz @ Ry @ Rx @ scale`` (angles in radians about spatial axes 0, 1, 2): batchgeneratorsv2's
    ``create_affine_matrix_3d``."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx * scale


@dataclass(frozen=True)
class Affine:
    """Rotation and scaling about the volume centre as one resampling.

    Args:
        matrix: 3x3, in millimetres: the output at a point ``p`` (mm from the centre) is the
            input at ``matrix @ p``. A scale above 1 shows more of the volume, smaller.
        spacing: the grid's voxel size in mm, so that the rotation turns the anatomy, not the voxels.

    The image is interpolated trilinearly and padded with its own minimum (the background of a
    z-scored scan); the label is read at the nearest voxel and padded with background.
    """

    matrix: tuple[tuple[float, float, float], ...]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def rotation(cls, angles: Sequence[float], scale: float = 1.0,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> "Affine":
        """Rotation by ``angles`` (radians, about axes 0, 1, 2) and ``scale``: :func:`rotation_matrix`."""
        m = rotation_matrix(angles, scale)
        rows = ((float(m[0, 0]), float(m[0, 1]), float(m[0, 2])), (float(m[1, 0]), float(m[1, 1]), float(m[1, 2])),
                (float(m[2, 0]), float(m[2, 1]), float(m[2, 2])))
        return cls(rows, (float(spacing[0]), float(spacing[1]), float(spacing[2])))

    def theta(self, shape: Sequence[int]) -> torch.Tensor:
        """The ``(3, 4)`` matrix of ``F.affine_grid`` for a grid of ``shape`` (X, Y, Z).

        With ``align_corners=False`` a voxel index ``i`` is the normalised coordinate
        ``n = (2 i + 1) / N - 1``, that is ``i - centre = n N / 2``: so the matrix in normalised
        coordinates is ``D^-1 S^-1 M S D`` (``D = N / 2``, ``S`` the spacing), and its axes are
        reversed, since ``grid_sample`` lists them as (Z, Y, X).
        """
        d = np.diag([n / 2 for n in shape]) @ np.diag(self.spacing)
        m = np.linalg.inv(d) @ np.asarray(self.matrix, dtype=np.float64) @ d
        m = m[::-1, ::-1]
        return torch.from_numpy(np.concatenate([m, np.zeros((3, 1))], 1).astype(np.float32))

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        imgs, labs = _resample(image[None], label[None], [self])
        return imgs[0], labs[0]


def _resample(images: torch.Tensor, labels: torch.Tensor, affines: Sequence[Affine]) -> Pair:
    """One ``grid_sample`` over the batch, each sample with its own matrix: the
    image trilinear (padded with its minimum, the background of a z-scored
    scan), the label at the nearest voxel (padded with background)."""
    shape = images.shape[2:]
    theta = torch.stack([a.theta(shape) for a in affines]).to(images.device)
    grid = F.affine_grid(theta, [len(affines), 1, *shape], align_corners=False)
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    out = F.grid_sample(images.float() - low, grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False) + low
    lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return out.to(images.dtype), lab[:, 0].round().to(labels.dtype)


@dataclass(frozen=True)
class GaussianNoise:
    """Add Gaussian noise of standard deviation ``std``; ``seed`` makes the noise itself replayable."""

    std: float
    seed: int

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        g = torch.Generator(device=image.device).manual_seed(self.seed)
        noise = torch.randn(image.shape, generator=g, device=image.device, dtype=torch.float32)
        return image + self.std * noise.to(image.dtype), label


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A 1D Gaussian of ``sigma`` voxels, cut at 3 sigma, summing to one."""
    radius = max(1, math.ceil(3 * sigma))
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur with ``sigma`` voxels along each axis: one 1D convolution
    per axis (a 3D Gaussian is separable), edges replicated."""

    sigma: tuple[float, float, float]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        x = image.float()[:, None]  # (C, 1, X, Y, Z): channels blurred alike
        for axis, s in enumerate(self.sigma):
            if s <= 0:
                continue
            k = gaussian_kernel(s).to(x.device)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = len(k)  # the kernel lies along this axis
            pad = [0, 0, 0, 0, 0, 0]
            pad[4 - 2 * axis] = pad[5 - 2 * axis] = len(k) // 2
            x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
        return x[:, 0].to(image.dtype), label


@dataclass(frozen=True)
class Brightness:
    """Multiply intensities by ``multiplier``."""

    multiplier: float

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        return image * self.multiplier, label


@dataclass(frozen=True)
class Contrast:
    """Stretch intensities about their mean by ``factor``, then clip to the range they had."""

    factor: float

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        dims = tuple(range(1, image.dim()))
        mean = image.mean(dims, keepdim=True)
        lo, hi = image.amin(dims, keepdim=True), image.amax(dims, keepdim=True)
        return torch.maximum(torch.minimum((image - mean) * self.factor + mean, hi), lo), label


@dataclass(frozen=True)
class LowResolution:
    """Simulate a coarser scan: nearest-neighbour down to ``scale`` of the size, trilinear back up."""

    scale: float

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        shape = image.shape[1:]
        small = [max(1, round(n * self.scale)) for n in shape]
        x = F.interpolate(image[None].float(), size=small, mode="nearest-exact")
        x = F.interpolate(x, size=list(shape), mode="trilinear", align_corners=False)
        return x[0].to(image.dtype), label


@dataclass(frozen=True)
class Gamma:
    """Gamma on the intensity range (``invert``: of the negated image), mean and spread kept."""

    gamma: float
    invert: bool = False

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        dims = tuple(range(1, image.dim()))
        x = -image.float() if self.invert else image.float()
        mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        span = (hi - lo).clamp_min(1e-7)
        x = ((x - lo) / span).pow(self.gamma) * span + lo
        x = (x - x.mean(dims, keepdim=True)) * (std / x.std(dims, keepdim=True).clamp_min(1e-7)) + mean
        return (-x if self.invert else x).to(image.dtype), label


@dataclass(frozen=True)
class Augmentation:
    """One sample's augmentation, in nnU-Net's order: the spatial resampling, the intensity
    transforms, the mirroring. The identity (all defaults) returns its input unchanged."""

    spatial: Affine | None = None
    intensity: tuple = ()
    mirror: Mirror = field(default_factory=Mirror)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        images, labels = augment_batch(image[None], label[None], [self])
        return images[0], labels[0]


def augment_batch(images: torch.Tensor, labels: torch.Tensor, augmentations: Sequence[Augmentation]) -> Pair:
    """Apply ``augmentations[i]`` to sample ``i`` of a batch, where the batch lives.

    The resampling, which costs the most, runs once for every sample that has one; the
    intensity transforms and mirroring are applied sample by sample (element-wise work).

    Args:
        images: ``(N, C, X, Y, Z)`` float.
        labels: ``(N, X, Y, Z)`` integer.
        augmentations: one :class:`Augmentation` per sample.
    """
    if len(augmentations) != images.shape[0]:
        raise ValueError(f"{len(augmentations)} augmentations for a batch of {images.shape[0]}")
    moved = [i for i, a in enumerate(augmentations) if a.spatial is not None]
    if moved:
        images, labels = images.clone(), labels.clone()
        index = torch.tensor(moved, device=images.device)
        spatial = [a for a in (augmentations[i].spatial for i in moved) if a is not None]
        imgs, labs = _resample(images[index], labels[index], spatial)
        images[index], labels[index] = imgs, labs
    out_i, out_l = [], []
    for aug, image, label in zip(augmentations, images, labels):
        for t in aug.intensity:
            image, label = t(image, label)
        image, label = aug.mirror(image, label)
        out_i.append(image)
        out_l.append(label)
    return torch.stack(out_i), torch.stack(out_l)


def _either_side_of_one(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgeneratorsv2's ``BGContrast``: half the time below 1, half above, each uniform."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


@dataclass(frozen=True)
class RandomAugmentation:
    """nnU-Net's default training augmentation: probabilities and ranges as nnU-Net v2 sets them.

    Each ``p_*`` is the probability that a sample gets that transform (nnU-Net's apply probability
    times its per-channel probability, for one channel). Ranges: rotation uniform in
    ``+-max_rotation_degrees`` about each axis; scale uniform in ``scaling``; noise standard
    deviation uniform in ``noise_std``; blur sigma (voxels) uniform in ``blur_sigma`` per axis;
    brightness, contrast and gamma below or above 1 with equal chance, then uniform on that side;
    low resolution uniform in ``low_resolution``; each of ``mirror_axes`` mirrored with
    ``p_mirror``.
    """

    p_rotation: float = 0.2
    max_rotation_degrees: float = 30.0
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
    mirror_axes: tuple[int, ...] = FLIP_AXES
    p_mirror: float = 0.5

    def __post_init__(self) -> None:
        for name in ("p_rotation", "p_scaling", "p_noise", "p_blur", "p_brightness", "p_contrast",
                     "p_low_resolution", "p_gamma_inverted", "p_gamma", "p_mirror"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise SettingsError(f"mirror_axes must be among 0, 1, 2, got {self.mirror_axes}")

    def rotation_angles(self, rng: np.random.Generator, spacing: Sequence[float]) -> list[float]:
        """Angles (radians) about axes 0, 1, 2: all three within the range, or, for thick slices,
        only about the thick axis (in-plane) and anywhere in +-180 degrees (nnU-Net's rule)."""
        spacing = list(spacing)
        if max(spacing) / min(spacing) > ANISO_THRESHOLD:
            angles = [0.0, 0.0, 0.0]
            angles[int(np.argmax(spacing))] = float(rng.uniform(-math.pi, math.pi))
            return angles
        r = math.radians(self.max_rotation_degrees)
        return [float(rng.uniform(-r, r)) for _ in range(3)]

    def sample(self, rng: np.random.Generator, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Augmentation:
        """The deterministic :class:`Augmentation` for one sample whose grid has ``spacing`` (mm)."""
        rotate, scale = rng.random() < self.p_rotation, rng.random() < self.p_scaling
        spatial = None
        if rotate or scale:
            angles = self.rotation_angles(rng, spacing) if rotate else [0.0, 0.0, 0.0]
            s = float(rng.uniform(*self.scaling)) if scale else 1.0
            spatial = Affine.rotation(angles, s, spacing)
        intensity: list = []
        if rng.random() < self.p_noise:
            intensity.append(GaussianNoise(float(rng.uniform(*self.noise_std)), int(rng.integers(2**62))))
        if rng.random() < self.p_blur:
            sigma = [float(rng.uniform(*self.blur_sigma)) for _ in range(3)]
            intensity.append(GaussianBlur((sigma[0], sigma[1], sigma[2])))
        if rng.random() < self.p_brightness:
            intensity.append(Brightness(_either_side_of_one(rng, *self.brightness)))
        if rng.random() < self.p_contrast:
            intensity.append(Contrast(_either_side_of_one(rng, *self.contrast)))
        if rng.random() < self.p_low_resolution:
            intensity.append(LowResolution(float(rng.uniform(*self.low_resolution))))
        if rng.random() < self.p_gamma_inverted:
            intensity.append(Gamma(_either_side_of_one(rng, *self.gamma), invert=True))
        if rng.random() < self.p_gamma:
            intensity.append(Gamma(_either_side_of_one(rng, *self.gamma)))
        mirror = Mirror(tuple(a for a in self.mirror_axes if rng.random() < self.p_mirror))
        return Augmentation(spatial, tuple(intensity), mirror)


def augmentation_named(spec: str | dict) -> RandomAugmentation | None:
    """The :class:`RandomAugmentation` a training setting names: a key of :data:`AUGMENTATIONS`,
    ``"none"`` (None: no augmentation), or a dict of settings changed from nnU-Net's
    (``{"p_rotation": 0.1}``).

    Example:
        >>> augmentation_named({"p_noise": 0.0}).p_noise
        0.0
    """
    if isinstance(spec, dict):
        unknown = set(spec) - set(RandomAugmentation.__dataclass_fields__)
        if unknown:
            raise SettingsError(f"unknown augmentation settings: {', '.join(sorted(unknown))}")
        fixed: dict = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        return dataclasses.replace(AUGMENTATIONS["nnunet"], **fixed)
    if spec == "none":
        return None
    if spec not in AUGMENTATIONS:
        raise SettingsError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, none or a dict of "
                            f"settings, got {spec!r}")
    return AUGMENTATIONS[spec]


AUGMENTATIONS: dict[str, RandomAugmentation] = {
    # nnU-Net's default set, probabilities and ranges: for long runs (the full preset).
    "nnunet": RandomAugmentation(),
    # The same code with the lighter ranges and probabilities of hipseg's earlier set (rotation up to
    # 10 degrees in 30 % of samples, brightness 0.9-1.1 and gamma 0.74-1.35 each in 30 %, mirroring):
    # for the cpu preset's short run, where nnU-Net's set cost validation Dice. Chosen on the
    # validation cases: benchmarks/results/augmentation.md.
    "light": RandomAugmentation(p_rotation=0.3, max_rotation_degrees=10.0, p_scaling=0.0, p_noise=0.0, p_blur=0.0,
                                p_brightness=0.3, brightness=(0.9, 1.1), p_contrast=0.0, p_low_resolution=0.0,
                                p_gamma_inverted=0.0, p_gamma=0.3, gamma=(0.74, 1.35)),
}


# ---- patches ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crop:
    """Cut a box of ``size`` starting at ``start``; padded (image: its minimum, label:
    background) where the box leaves the volume."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Pair:
        out_i = torch.full((image.shape[0], *self.size), float(image.min()), dtype=image.dtype, device=image.device)
        out_l = torch.zeros(self.size, dtype=label.dtype, device=label.device)
        src, dst = [], []
        for s, n, full in zip(self.start, self.size, label.shape):
            a, b = max(s, 0), min(s + n, full)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out_i[(slice(None), *dst)] = image[(slice(None), *src)]
        out_l[tuple(dst)] = label[tuple(src)]
        return out_i, out_l


@dataclass(frozen=True)
class RandomPatch:
    """A box of ``size`` for patch training: with probability ``foreground_fraction`` centred on a
    voxel of one foreground class present in the label (the class drawn uniformly, then the voxel;
    nnU-Net's oversampling, so that small organs are seen often), else placed uniformly.

    A box larger than the volume is centred on it (and padded by :class:`Crop`).
    """

    size: tuple[int, int, int]
    foreground_fraction: float = 0.0

    def sample(self, rng: np.random.Generator, label: torch.Tensor) -> Crop:
        shape = tuple(label.shape)
        if self.foreground_fraction > 0 and rng.random() < self.foreground_fraction:
            present = [int(c) for c in torch.unique(label).tolist() if c > 0]
            if present:
                voxels = torch.nonzero(label == present[int(rng.integers(len(present)))]).cpu().numpy()
                centre = voxels[int(rng.integers(len(voxels)))]
                at = [int(np.clip(c - s // 2, min(0, n - s), max(0, n - s)))
                      for c, s, n in zip(centre, self.size, shape)]
                return Crop((at[0], at[1], at[2]), self._size)
        at = [int(rng.integers(0, n - s + 1)) if n >= s else -((s - n) // 2) for n, s in zip(shape, self.size)]
        return Crop((at[0], at[1], at[2]), self._size)

    @property
    def _size(self) -> tuple[int, int, int]:
        return (int(self.size[0]), int(self.size[1]), int(self.size[2]))
