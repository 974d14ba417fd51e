"""hipseg's training pipeline before the augmentation moved to the device, kept only to be measured
by ``bench_loader.py``: scipy transforms on numpy arrays, one volume at a time, in DataLoader worker
processes (``SegmentationDataset`` with ``default_augmentation()`` as it was).

Its flaw besides speed: with ``persistent_workers=True`` each worker keeps its own copy of the
dataset, so ``set_epoch`` in the main process never reaches it and every epoch repeats the first
epoch's augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

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


FLIP_AXES: tuple[int, ...] = (0,)


def default_augmentation(rotate_degrees: float = 10.0) -> RandomCompose:
    """The training augmentation: left-right flip, small axial rotation, gamma, scale/shift."""
    return RandomCompose((
        RandomFlip(axes=FLIP_AXES, p=0.5),
        RandomRotate(max_degrees=rotate_degrees, p=0.3),
        RandomGamma(log_range=0.3, p=0.3),
        RandomScaleShift(scale=0.1, shift=0.1, p=0.3),
    ))


class ScipyAugmentedDataset(Dataset):
    """Cached volumes, each augmented with ``default_augmentation()`` from
    ``np.random.default_rng([seed, epoch, i])`` (the earlier ``SegmentationDataset``)."""

    def __init__(self, volumes, seed: int = 0):
        self.arrays = [v.load(mmap=False) for v in volumes]
        self.augmentation = default_augmentation()
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int):
        img, lab = self.arrays[i]
        t = self.augmentation.sample(np.random.default_rng([self.seed, self.epoch, i]))
        img, lab = t(np.asarray(img), np.asarray(lab))
        return (torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None],
                torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64)))
