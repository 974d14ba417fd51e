"""Augmentation: random transforms sample parameters, deterministic transforms apply them.

Every deterministic transform maps ``(image, label) -> (image, label)`` on arrays of shape
(x, y, z); geometric ones move image and label identically (image linear, label nearest),
intensity ones leave the label alone. A random transform's :meth:`sample` returns the
deterministic transform it would apply, so every augmentation can be replayed and tested.

Example:
    >>> aug = default_augmentation()
    >>> t = aug.sample(np.random.default_rng(0))   # a Compose of deterministic transforms
    >>> img2, lab2 = t(img, lab)                    # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "Flip", "Rotate", "Crop", "Gamma", "ScaleShift", "Compose",
    "RandomFlip", "RandomRotate", "RandomPatch", "RandomGamma", "RandomScaleShift", "RandomCompose",
    "default_augmentation", "FLIP_AXES",
]

Arrays = tuple[np.ndarray, np.ndarray]


# ---- deterministic transforms -------------------------------------------------------------
@dataclass(frozen=True)
class Flip:
    """Mirror along the given axes."""

    axes: tuple[int, ...]

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Arrays:
        if not self.axes:
            return image, label
        return np.flip(image, self.axes).copy(), np.flip(label, self.axes).copy()


@dataclass(frozen=True)
class Rotate:
    """Rotate by ``degrees`` in the axial (x, y) plane about the volume centre."""

    degrees: float

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Arrays:
        if self.degrees == 0:
            return image, label
        img = ndimage.rotate(image, self.degrees, axes=(0, 1), reshape=False, order=1,
                             mode="constant", cval=float(image.min()))
        lab = ndimage.rotate(label, self.degrees, axes=(0, 1), reshape=False, order=0,
                             mode="constant", cval=0)
        return img.astype(np.float32), lab.astype(np.uint8)


@dataclass(frozen=True)
class Crop:
    """Crop a box of ``size`` starting at ``start``; zero-padded where it leaves the volume."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Arrays:
        out_i = np.full(self.size, float(image.min()), np.float32)
        out_l = np.zeros(self.size, np.uint8)
        src, dst = [], []
        for s, n, full in zip(self.start, self.size, image.shape):
            a, b = max(s, 0), min(s + n, full)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out_i[tuple(dst)] = image[tuple(src)]
        out_l[tuple(dst)] = label[tuple(src)]
        return out_i, out_l


@dataclass(frozen=True)
class Gamma:
    """Gamma change of contrast on the intensity range, which is kept."""

    gamma: float

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Arrays:
        if self.gamma == 1.0:
            return image, label
        lo, hi = float(image.min()), float(image.max())
        if hi <= lo:
            return image, label
        x = (image - lo) / (hi - lo)
        return (np.power(x, self.gamma) * (hi - lo) + lo).astype(np.float32), label


@dataclass(frozen=True)
class ScaleShift:
    """Intensity ``image * scale + shift``."""

    scale: float
    shift: float

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Arrays:
        return (image * self.scale + self.shift).astype(np.float32), label


@dataclass(frozen=True)
class Compose:
    transforms: tuple = ()

    def __call__(self, image: np.ndarray, label: np.ndarray) -> Arrays:
        for t in self.transforms:
            image, label = t(image, label)
        return image, label


# ---- random transforms: sample parameters -> deterministic transform ------------------------
@dataclass(frozen=True)
class RandomFlip:
    """Flip each listed axis with probability ``p`` (default: left-right only)."""

    axes: tuple[int, ...] = (0,)
    p: float = 0.5

    def sample(self, rng: np.random.Generator) -> Flip:
        return Flip(tuple(a for a in self.axes if rng.random() < self.p))


@dataclass(frozen=True)
class RandomRotate:
    """Axial rotation by an angle uniform in ``[-max_degrees, max_degrees]``, with probability ``p``."""

    max_degrees: float = 10.0
    p: float = 0.5

    def sample(self, rng: np.random.Generator) -> Rotate:
        if rng.random() >= self.p:
            return Rotate(0.0)
        return Rotate(float(rng.uniform(-self.max_degrees, self.max_degrees)))


@dataclass(frozen=True)
class RandomPatch:
    """A box of ``size`` for patch training: with probability ``foreground_fraction`` centred on a
    voxel of one foreground class present in the label (the class drawn uniformly, then the voxel;
    nnU-Net's oversampling, so that small organs are seen often), else placed uniformly.

    A box larger than the volume is centred on it (and padded by :class:`Crop`).
    """

    size: tuple[int, int, int]
    foreground_fraction: float = 0.0

    def sample(self, rng: np.random.Generator, label: np.ndarray) -> Crop:
        shape = label.shape
        if self.foreground_fraction > 0 and rng.random() < self.foreground_fraction:
            present = [c for c in np.unique(label) if c > 0]
            if present:
                voxels = np.argwhere(label == present[int(rng.integers(len(present)))])
                centre = voxels[int(rng.integers(len(voxels)))]
                start = tuple(int(np.clip(c - s // 2, min(0, n - s), max(0, n - s)))
                              for c, s, n in zip(centre, self.size, shape))
                return Crop(start, tuple(self.size))
        start = tuple(int(rng.integers(0, n - s + 1)) if n >= s else -((s - n) // 2)
                      for n, s in zip(shape, self.size))
        return Crop(start, tuple(self.size))


@dataclass(frozen=True)
class RandomGamma:
    """Gamma ``exp(u)`` with ``u`` uniform in ``[-log_range, log_range]``, with probability ``p``."""

    log_range: float = 0.3
    p: float = 0.5

    def sample(self, rng: np.random.Generator) -> Gamma:
        if rng.random() >= self.p:
            return Gamma(1.0)
        return Gamma(float(np.exp(rng.uniform(-self.log_range, self.log_range))))


@dataclass(frozen=True)
class RandomScaleShift:
    """Scale uniform in ``1 +- scale``, shift uniform in ``+- shift``, with probability ``p``."""

    scale: float = 0.1
    shift: float = 0.1
    p: float = 0.5

    def sample(self, rng: np.random.Generator) -> ScaleShift:
        if rng.random() >= self.p:
            return ScaleShift(1.0, 0.0)
        return ScaleShift(float(rng.uniform(1 - self.scale, 1 + self.scale)),
                          float(rng.uniform(-self.shift, self.shift)))


@dataclass(frozen=True)
class RandomCompose:
    transforms: tuple = field(default_factory=tuple)

    def sample(self, rng: np.random.Generator) -> Compose:
        return Compose(tuple(t.sample(rng) for t in self.transforms))


FLIP_AXES: tuple[int, ...] = (0,)  # the axes the training augmentation mirrors (left-right)


def default_augmentation(rotate_degrees: float = 10.0) -> RandomCompose:
    """The training augmentation: left-right flip, small axial rotation, gamma, scale/shift."""
    return RandomCompose((
        RandomFlip(axes=FLIP_AXES, p=0.5),
        RandomRotate(max_degrees=rotate_degrees, p=0.3),
        RandomGamma(log_range=0.3, p=0.3),
        RandomScaleShift(scale=0.1, shift=0.1, p=0.3),
    ))
