"""Preprocessing: orientation, cropping to the body, robust intensity normalisation, and the
network's grid: each body crop either resized to one shape, or resampled to one voxel spacing in
millimetres and padded (or cut) to that shape, keeping the anatomy's proportions.

The same :class:`Preprocessing` is stored in every checkpoint, so prediction applies
exactly what training saw; a :class:`Placement` says where a grid came from in its scan, so that a
prediction can be put back on the scan's own voxels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from . import HipsegError, SettingsError

__all__ = ["Preprocessing", "normalise_intensity", "resize_image", "resize_label",
           "foreground_box", "crop", "Placement", "place", "resampled_shape", "voxel_spacing",
           "preprocess_image", "preprocess_pair", "Reorientation", "reorient", "RESAMPLING"]

# How a body crop reaches the network's grid: "shape" resizes every crop to ``target_shape`` (each
# scan then has its own millimetres per voxel); "spacing" resamples every crop to one
# ``target_spacing`` and pads or cuts it, centred, to ``target_shape`` (nnU-Net's way).
RESAMPLING = ("shape", "spacing")


@dataclass(frozen=True)
class Preprocessing:
    """Preprocessing settings.

    Args:
        target_shape: the network's grid (x, y, z).
        clip_percentiles: intensities are clipped to these percentiles before z-scoring.
        crop_foreground: crop each volume to the body's bounding box (found from the image
            alone) before resizing, so the target grid is spent on the patient, not on air.
        orientation: voxel-axis codes every volume is turned to first (HipMRI is stored LPS),
            so a scan stored in another orientation reaches the network the same way.
        resample: ``"shape"``: each body crop is resized to ``target_shape``; ``"spacing"``: it is
            resampled to ``target_spacing`` and padded or cut (centred) to ``target_shape``.
        target_spacing: voxel size in mm (x, y, z) of the grid for ``resample="spacing"``, planned
            from the training set (:func:`hipseg_lib.data.plan_target_spacing`); None until then.

    Example:
        >>> Preprocessing(target_shape=(64, 64, 32)).to_dict()["target_shape"]
        [64, 64, 32]
    """

    target_shape: tuple[int, int, int] = (64, 64, 32)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    orientation: str = "LPS"
    resample: str = "shape"
    target_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.target_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise SettingsError(f"target_shape must be three positive sizes, got {self.target_shape}")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise SettingsError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        object.__setattr__(self, "target_shape", shape)
        object.__setattr__(self, "clip_percentiles", (float(lo), float(hi)))
        try:
            axcodes2ornt(tuple(self.orientation))
        except (ValueError, TypeError, KeyError):
            raise SettingsError(f"orientation must be three axis codes such as 'LPS', "
                                f"got {self.orientation!r}") from None
        if len(self.orientation) != 3:
            raise SettingsError(f"orientation must be three axis codes such as 'LPS', got {self.orientation!r}")
        if self.resample not in RESAMPLING:
            raise SettingsError(f"resample must be one of {', '.join(RESAMPLING)}, got {self.resample!r}")
        if self.target_spacing is not None:
            spacing = tuple(float(v) for v in self.target_spacing)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise SettingsError(f"target_spacing must be three sizes in mm > 0, got {self.target_spacing}")
            object.__setattr__(self, "target_spacing", spacing)

    def to_dict(self) -> dict:
        """Plain JSON values (lists, not tuples): what a checkpoint stores."""
        d = asdict(self)
        d["target_shape"], d["clip_percentiles"] = list(self.target_shape), list(self.clip_percentiles)
        d["target_spacing"] = list(self.target_spacing) if self.target_spacing is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Inverse of :meth:`to_dict` (a checkpoint stores every setting)."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SettingsError(f"unknown preprocessing settings: {', '.join(sorted(unknown))}")
        return cls(**d)


def normalise_intensity(
    image: np.ndarray,
    clip_percentiles: tuple[float, float] = (0.5, 99.5),
    name: str = "image",
) -> np.ndarray:
    """Clip to robust percentiles, then z-score (zero mean, unit variance),
    as float32.

    Robust to the bright outliers (urine, fat, vessels) and to scanner gain:
    two scans that differ by a gain and an offset give the same result.

    Raises:
        HipsegError: the image is constant after clipping.
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, clip_percentiles)
    img = np.clip(img, lo, hi)
    std = float(img.std())
    if std == 0.0 or not np.isfinite(std):
        raise HipsegError(
            f"{name}: constant image, cannot normalise intensities")
    return ((img - img.mean()) / std).astype(np.float32)


def resize_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resize of the last ``len(shape)`` axes of a float array, one
    axis at a time (trilinear for three). Output voxel ``i`` reads the input at
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
        centre = ((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
        out = np.take(out, np.minimum(centre, n_in - 1), axis=axis)
    return out


Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def foreground_box(image: np.ndarray, margin: int = 2) -> Box:
    """Bounding box ``((x0, x1), (y0, y1), (z0, z1))`` of the body, found from
    the image alone.

    The image is smoothed and thresholded 30 % of the way from the background
    level (the 5th percentile) to the 90th percentile; the box of what is
    above the threshold is grown by ``margin`` voxels. A volume where nothing
    stands out keeps its full extent. Because it needs no label, prediction
    crops new scans the same way.
    """
    small = ndimage.gaussian_filter(np.asarray(image, np.float32), 1.0)
    lo = float(np.percentile(small, 5))
    hi = float(np.percentile(small, 90))
    mask = small > lo + 0.3 * (hi - lo)
    if hi <= lo or mask.sum() < 0.01 * mask.size:
        return _whole(image.shape)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = mask.sum(axis=other)
        idx = np.nonzero(profile >= max(1, 0.002 * profile.max()))[0]
        a, b = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        box.append((max(a, 0), min(b, image.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array`` inside ``box``."""
    return array[tuple(slice(a, b) for a, b in box)]


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size in mm along each array axis: the length of each column of the affine.

    Example:
        >>> voxel_spacing(np.diag([-2.0, -2.0, 3.0, 1.0]))
        (2.0, 2.0, 3.0)
    """
    return tuple(float(v) for v in np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0)))  # type: ignore


def resampled_shape(shape, spacing, target_spacing) -> tuple[int, int, int]:
    """The shape of an array of ``shape`` voxels of ``spacing`` mm, resampled to ``target_spacing``:
    the same extent in mm, rounded to whole voxels.

    Example:
        >>> resampled_shape((100, 100, 40), (1.0, 1.0, 4.0), (2.0, 2.0, 2.0))
        (50, 50, 80)
    """
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))  # type: ignore


@dataclass(frozen=True)
class Placement:
    """Where a preprocessed grid came from: the body crop ``box`` in the (reoriented) scan, the
    crop's shape once resampled (``resampled``), and where that sits in the ``grid``: from
    ``offset`` on, centred (a negative offset: that many voxels were cut at the start)."""

    box: Box
    resampled: tuple[int, int, int]
    grid: tuple[int, int, int]

    @property
    def offset(self) -> tuple[int, int, int]:
        return tuple((g - r) // 2 for g, r in zip(self.grid, self.resampled))  # type: ignore[return-value]

    @property
    def cut(self) -> tuple[int, int, int]:
        """Voxels of the resampled crop that did not fit in the grid, per axis (0: nothing cut)."""
        return tuple(max(0, r - g) for r, g in zip(self.resampled, self.grid))  # type: ignore[return-value]

    def crop_spacing(self, spacing) -> tuple[float, float, float]:
        """The grid's voxel size in mm, for a scan of ``spacing`` (as oriented)."""
        return tuple(float(s) * (b - a) / n for s, (a, b), n in zip(spacing, self.box, self.resampled))  # type: ignore

    def from_grid(self, array):
        """The part of ``array`` (``(..., *grid)``, numpy or torch) that holds the resampled crop:
        ``(..., *resampled)``. A prediction grid is never cut (see :func:`preprocess_image`)."""
        if any(self.cut):
            raise ValueError(f"this grid cut {self.cut} voxels off its crop: it cannot be put back whole")
        lead = (slice(None),) * (array.ndim - 3)
        return array[lead + tuple(slice(o, o + r) for o, r in zip(self.offset, self.resampled))]

    def to_dict(self) -> dict:
        return {"box": [list(b) for b in self.box], "resampled": list(self.resampled), "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls(tuple(tuple(b) for b in d["box"]), tuple(d["resampled"]), tuple(d["grid"]))  # type: ignore


def place(array: np.ndarray, grid, fill: float = 0) -> np.ndarray:
    """``array`` centred in a new array of shape ``grid``: padded with ``fill`` where it is smaller,
    cut (evenly on both sides) where it is larger.

    Example:
        >>> place(np.ones((2, 5, 1)), (4, 3, 1)).sum(axis=(1, 2)).tolist()
        [0.0, 3.0, 3.0, 0.0]
    """
    out = np.full(tuple(grid), fill, dtype=array.dtype)
    src, dst = [], []
    for n, g in zip(array.shape, grid):
        o = (g - n) // 2
        src.append(slice(max(0, -o), max(0, -o) + min(n, g)))
        dst.append(slice(max(0, o), max(0, o) + min(n, g)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def preprocess_image(
    image: np.ndarray,
    cfg: Preprocessing,
    spacing=(1.0, 1.0, 1.0),
    name: str = "image",
    divisor: int | None = None,
) -> tuple[np.ndarray, Placement]:
    """Crop to the body (if ``cfg.crop_foreground``), normalise, and bring the
    crop to the grid.

    With ``cfg.resample == "shape"`` the crop is resized to
    ``cfg.target_shape``. With ``"spacing"`` it is resampled from ``spacing``
    (mm, of the oriented image) to ``cfg.target_spacing`` and centred in
    ``cfg.target_shape``, padded with the crop's lowest value (air); with
    ``divisor`` (prediction) it is centred in the same grid, grown to the
    next multiples of ``divisor`` along an axis where the crop is larger, so
    nothing is ever cut and the network sees as much air around the body as
    in training (instance norm's statistics include it).

    Returns:
        The array on the grid and its :class:`Placement`.
    """
    if cfg.crop_foreground:
        box: Box = foreground_box(image)
    else:
        box = _whole(image.shape)
    norm = normalise_intensity(crop(image, box), cfg.clip_percentiles, name)
    shape: tuple[int, int, int]
    grid: tuple[int, int, int]
    if cfg.resample == "shape":
        shape = grid = cfg.target_shape
    else:
        if cfg.target_spacing is None:
            raise SettingsError("resample='spacing' needs a target_spacing "
                                "(plan it: data.plan_target_spacing)")
        shape = resampled_shape(norm.shape, spacing, cfg.target_spacing)
        if divisor is None:
            grid = cfg.target_shape
        else:  # training's grid, grown to multiples of divisor if too small
            x, y, z = (max(t, -(-n // divisor) * divisor)
                       for n, t in zip(shape, cfg.target_shape))
            grid = (x, y, z)
    img = resize_image(norm, shape)
    return place(img, grid, float(img.min())), Placement(box, shape, grid)


def _whole(shape) -> Box:
    """The box of a whole volume of ``shape``."""
    return ((0, int(shape[0])), (0, int(shape[1])), (0, int(shape[2])))


def preprocess_pair(image: np.ndarray, label: np.ndarray, cfg: Preprocessing,
                    spacing=(1.0, 1.0, 1.0), name: str = "image"
                    ) -> tuple[np.ndarray, np.ndarray, Placement]:
    """:func:`preprocess_image`, and its label cropped, resized (nearest
    neighbour) and placed the same way."""
    img, where = preprocess_image(image, cfg, spacing, name)
    lab = resize_label(crop(label, where.box), where.resampled)
    return img, place(lab, where.grid, 0), where


@dataclass(frozen=True)
class Reorientation:
    """A voxel-axis permutation/flip to a target orientation, and its inverse."""

    forward: np.ndarray
    backward: np.ndarray

    def apply(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(array, self.forward))

    def undo(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(apply_orientation(array, self.backward))

    def spacing(self, spacing) -> tuple[float, float, float]:
        """Voxel spacing after :meth:`apply`."""
        out = [0.0, 0.0, 0.0]
        for i, (axis, _) in enumerate(self.forward):
            out[int(axis)] = float(spacing[i])
        return tuple(out)  # type: ignore[return-value]


def reorient(affine: np.ndarray, codes: str = "LPS") -> Reorientation:
    """How to turn an array with ``affine`` to the axis ``codes`` (and back).

    Example:
        >>> r = reorient(np.diag([1.0, 1, 1, 1]), "LPS")  # flips x and y
        >>> r.apply(np.arange(8).reshape(2, 2, 2))[0, 0, 0]
        np.int64(6)
    """
    src = io_orientation(affine)
    dst = axcodes2ornt(tuple(codes))
    return Reorientation(ornt_transform(src, dst), ornt_transform(dst, src))
