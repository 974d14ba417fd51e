"""Preprocessing: turn every scan to one orientation, crop it to the body,
normalise its intensities and resize the crop to the network's grid.

The same :class:`Preprocessing` is stored in every checkpoint, so prediction
repeats exactly what training saw, and the crop's box says where a grid came
from, so a prediction goes back onto the scan's own voxels. No torch here: the
torch-free prediction path (an exported model) runs it too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)
from scipy import ndimage

from . import HipsegError, SettingsError

__all__ = ["Preprocessing", "Reorientation", "reorient", "voxel_spacing",
           "foreground_box", "crop", "normalise_intensity", "resize_image",
           "resize_label", "preprocess_image", "preprocess_pair", "Box"]

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Preprocessing:
    """What every volume goes through (stored in every checkpoint).

    Args:
        target_shape: the network's grid (x, y, z) every crop is resized to.
        clip_percentiles: intensities are clipped to these before z-scoring.
        crop_foreground: crop to the body's box (found from the image alone,
            by :func:`foreground_box` with the ``crop_*`` settings).
        orientation: the axis codes every scan is turned to (HipMRI: LPS).
    """

    target_shape: tuple[int, int, int] = (64, 64, 48)  # the cpu preset's
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    orientation: str = "LPS"
    crop_smoothing: float = 1.0  # Gaussian sigma (voxels)
    crop_percentiles: tuple[float, float] = (5.0, 90.0)  # air, bright tissue
    crop_threshold: float = 0.3  # how far from the one to the other
    crop_min_share: float = 0.01  # less above it: nothing stands out
    crop_row_share: float = 0.002  # of the fullest row: a row of the body
    crop_margin: int = 2  # voxels added on each side

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.target_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise SettingsError(f"target_shape must be three sizes, "
                                f"got {self.target_shape}")
        lo, hi = (float(p) for p in self.clip_percentiles)
        if not 0 <= lo < hi <= 100:
            raise SettingsError(f"clip_percentiles must be 0 <= low < high "
                                f"<= 100, got {self.clip_percentiles}")
        air, tissue = self.crop_percentiles
        shares = (self.crop_threshold, self.crop_min_share,
                  self.crop_row_share)
        if not (0 <= air < tissue <= 100 and all(0 <= s < 1 for s in shares)
                and self.crop_smoothing >= 0 and self.crop_margin >= 0):
            raise SettingsError("crop_percentiles must be 0 <= low < high <= "
                                "100, crop_threshold and the crop shares in "
                                "[0, 1), crop_smoothing and crop_margin >= 0")
        try:  # three codes, one for each direction (L or R, P or A, S or I)
            axcodes2ornt(tuple(self.orientation))
            valid = len(self.orientation) == 3
        except (ValueError, TypeError, KeyError):
            valid = False
        if not valid:
            raise SettingsError(f"orientation must be three axis codes such "
                                f"as 'LPS', got {self.orientation!r}")
        object.__setattr__(self, "target_shape", shape)
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        object.__setattr__(self, "crop_percentiles",
                           tuple(float(p) for p in self.crop_percentiles))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_shape"] = list(self.target_shape)
        d["clip_percentiles"] = list(self.clip_percentiles)
        d["crop_percentiles"] = list(self.crop_percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"unknown preprocessing settings: "
                                f"{', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass(frozen=True)
class Reorientation:
    """How to turn an array's axes to another orientation, and back: one row
    per axis, (the axis it becomes, 1 kept or -1 flipped)."""

    forward: np.ndarray
    backward: np.ndarray

    def apply(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(array, self.forward))

    def undo(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(array, self.backward))

    def spacing(self, spacing) -> tuple[float, float, float]:
        """The voxel size after :meth:`apply`: it moves with its axis."""
        out = [0.0, 0.0, 0.0]
        for i, (axis, _) in enumerate(self.forward):
            out[int(axis)] = float(spacing[i])
        return out[0], out[1], out[2]


def reorient(affine: np.ndarray, codes: str = "LPS") -> Reorientation:
    """How to turn an array with ``affine`` to the axis ``codes``, and back.

    Example:
        >>> r = reorient(np.diag([1.0, 1, 1, 1]), "LPS")  # RAS: x, y flip
        >>> r.apply(np.arange(8).reshape(2, 2, 2))[0, 0, 0]
        np.int64(6)
    """
    here = io_orientation(affine)  # the codes the affine says
    there = axcodes2ornt(tuple(codes))
    return Reorientation(ornt_transform(here, there),
                         ornt_transform(there, here))


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size (mm) along each array axis: the length of each of the
    affine's first three columns.

    Example:
        >>> voxel_spacing(np.diag([-2.0, -2.0, 3.0, 1.0]))
        (2.0, 2.0, 3.0)
    """
    x, y, z = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    return float(x), float(y), float(z)


def foreground_box(image: np.ndarray,
                   cfg: Preprocessing | None = None) -> Box:
    """The body's bounding box ``((x0, x1), (y0, y1), (z0, z1))``, from the
    image alone, so that prediction crops a new scan the same way.

    With ``cfg``'s ``crop_*`` settings (by default: the image smoothed with
    sigma 1 voxel, thresholded 30 % of the way from the background, the 5th
    percentile, to bright tissue, the 90th), each axis keeps the rows where
    more than a sliver is above the threshold, plus a margin of voxels. A
    volume where nothing stands out keeps its whole extent.
    """
    cfg = cfg or Preprocessing()
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32),
                                     cfg.crop_smoothing)
    lo, hi = np.percentile(smooth, cfg.crop_percentiles)
    mask = smooth > lo + cfg.crop_threshold * (hi - lo)
    if hi <= lo or mask.sum() < cfg.crop_min_share * mask.size:
        return whole_box(image.shape)
    box, m = [], cfg.crop_margin
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(axis=others)  # body voxels in each row
        rows = np.flatnonzero(
            profile >= max(1, cfg.crop_row_share * profile.max()))
        a, b = int(rows[0]) - m, int(rows[-1]) + 1 + m
        box.append((max(a, 0), min(b, image.shape[axis])))
    return box[0], box[1], box[2]


def whole_box(shape: Sequence[int]) -> Box:
    """The box of a whole volume of ``shape``."""
    x, y, z = (int(n) for n in shape[:3])
    return (0, x), (0, y), (0, z)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array`` inside ``box``."""
    return array[tuple(slice(a, b) for a, b in box)]


def normalise_intensity(image: np.ndarray, clip_percentiles=(0.5, 99.5),
                        name: str = "image") -> np.ndarray:
    """Clip to robust percentiles, then z-score (mean 0, standard deviation
    1), as float32: two scans that differ by a gain and an offset give the
    same result, and a few very bright voxels cannot set the scale.

    Raises:
        HipsegError: the image is constant once clipped.
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, clip_percentiles)
    img = np.clip(img, lo, hi)
    std = float(img.std())
    if std == 0.0:
        raise HipsegError(f"{name}: constant image, cannot normalise it")
    return ((img - img.mean()) / std).astype(np.float32)


def resize_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resize of the last ``len(shape)`` axes, one axis at a time
    (trilinear for three). Output voxel ``i`` reads the input at
    ``(i + 0.5) * n_in / n_out - 0.5``: voxel centres map to voxel centres,
    as PyTorch's ``interpolate(align_corners=False)`` samples.

    Example:
        >>> resize_image(np.array([0.0, 1.0]), (4,)).tolist()
        [0.0, 0.25, 0.75, 1.0]
    """
    out = np.asarray(image, dtype=np.float32)
    lead = out.ndim - len(shape)  # leading axes (channels) stay as they are
    for k, n_out in enumerate(shape):
        axis, n_in = lead + k, out.shape[lead + k]
        if n_in == n_out:
            continue
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)  # the voxel below ...
        i1 = np.minimum(i0 + 1, n_in - 1)    # ... and the one above
        w = (src - i0).astype(np.float32)
        w = w.reshape([n_out if a == axis else 1 for a in range(out.ndim)])
        out = (np.take(out, i0, axis=axis) * (1 - w)
               + np.take(out, i1, axis=axis) * w)
    return out


def resize_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map: each output voxel takes the
    label of the input voxel its centre falls in, so no new value appears.

    Example:
        >>> resize_label(np.array([[[1, 2, 3]]]), (1, 1, 6)).ravel().tolist()
        [1, 1, 2, 2, 3, 3]
    """
    out = np.asarray(label, dtype=np.uint8)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        centre = ((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(int)
        out = np.take(out, np.minimum(centre, n_in - 1), axis=axis)
    return out


def preprocess_image(image: np.ndarray, cfg: Preprocessing,
                     name: str = "image") -> tuple[np.ndarray, Box]:
    """Crop an (oriented) image to the body, normalise it and resize the crop
    to ``cfg.target_shape``; returns the grid and the crop's box."""
    box = foreground_box(image, cfg) if cfg.crop_foreground \
        else whole_box(image.shape)
    norm = normalise_intensity(crop(image, box), cfg.clip_percentiles, name)
    return resize_image(norm, cfg.target_shape), box


def preprocess_pair(image: np.ndarray, label: np.ndarray, cfg: Preprocessing,
                    name: str = "image") -> tuple[np.ndarray, np.ndarray, Box]:
    """:func:`preprocess_image`, and its label cropped to the same box and
    resized by nearest neighbour."""
    grid, box = preprocess_image(image, cfg, name)
    return grid, resize_label(crop(label, box), cfg.target_shape), box
