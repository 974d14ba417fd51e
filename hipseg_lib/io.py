"""Finding, pairing, loading and checking HipMRI-style NIfTI volumes.

Two real layouts are recognised: the CSIRO release
(``semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz`` with
``semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz``) and a
re-shared copy (``semantic_MRs/B006_Week0_LFOV.nii.gz`` with
``semantic_labels_only/B006_Week0_SEMANTIC.nii.gz``). Images and labels are
paired by the case and week in their names, never by sorting two lists.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from . import NUM_CLASSES, HipsegError, first_line

__all__ = ["VolumeId", "Pair", "PairSearch", "Volume", "parse_volume_name",
           "volume_id_in", "is_nifti", "find_pairs", "load_volume",
           "load_pair", "pair_problems", "constant_image_problem"]

# What nibabel raises for a file that is not a readable NIfTI: a bad header,
# a damaged gzip stream, a truncated file.
NIFTI_READ_ERRORS = (nib.filebasedimages.ImageFileError, ValueError, OSError,
                     EOFError, zlib.error, gzip.BadGzipFile, struct.error,
                     nib.spatialimages.HeaderDataError)

# A case ("Case_" and an optional letter before its number) and a week
_ID = r"(?:Case_)?(?P<case>[A-Za-z]?\d+)_Week(?P<week>\d+)"
_NAME = re.compile("^" + _ID
                   + r"(?P<label>_SEMANTIC)?(?:_LFOV)?\.nii(?:\.gz)?$")
_SKIP = {"keras_slices_data", ".ipynb_checkpoints", "__MACOSX"}


@dataclass(frozen=True, order=True)
class VolumeId:
    """One scan: a patient (case) and a week."""

    case: str
    week: int

    def __str__(self) -> str:
        return f"{self.case}_Week{self.week}"


@dataclass(frozen=True)
class Pair:
    """An image file and its label file."""

    id: VolumeId
    image: Path
    label: Path


def is_nifti(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def parse_volume_name(path: str | os.PathLike) -> tuple[VolumeId, str] | None:
    """A file's (case, week) and kind, ``"image"`` or ``"label"``; None when
    the name follows neither layout.

    Example:
        >>> parse_volume_name("semantic_MRs/B006_Week3_LFOV.nii.gz")
        (VolumeId(case='B006', week=3), 'image')
    """
    p = Path(path)
    m = _NAME.match(p.name)
    if not m:
        return None
    label = m.group("label") or "label" in p.parent.name.lower()
    return VolumeId(m.group("case"), int(m.group("week"))), \
        "label" if label else "image"


def volume_id_in(name: str) -> VolumeId | None:
    """The case and week anywhere in a file name (a prediction's, say).

    Example:
        >>> volume_id_in("Case_004_Week0_LFOV_pred.nii.gz")
        VolumeId(case='004', week=0)
    """
    m = re.search(_ID, name)
    return VolumeId(m.group("case"), int(m.group("week"))) if m else None


@dataclass
class PairSearch:
    """What :func:`find_pairs` found: the pairs, and the files it could not
    use, each a problem in words."""

    root: Path
    pairs: list[Pair] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_pairs(root: str | os.PathLike) -> PairSearch:
    """Every image/label pair under ``root`` (either layout, or one folder).

    Raises:
        HipsegError: ``root`` is missing, not a folder, or has no NIfTI file.
    """
    root = Path(root)
    if not root.is_dir():
        raise HipsegError(f"{root}: no such folder")
    search = PairSearch(root)
    found: dict[str, dict[VolumeId, Path]] = {"image": {}, "label": {}}
    nifti = 0
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders
                               if d not in _SKIP and not d.startswith("."))
        for name in sorted(f for f in files if is_nifti(f)):
            nifti += 1
            path = Path(folder) / name
            where = path.relative_to(root)
            parsed = parse_volume_name(path)
            if parsed is None:
                search.problems.append(
                    f"{where}: name is not "
                    "<Case>_Week<N>[_SEMANTIC][_LFOV].nii[.gz]")
            elif parsed[0] in found[parsed[1]]:
                search.problems.append(f"{where}: a second file for the "
                                       "same case and week")
            else:
                found[parsed[1]][parsed[0]] = path
    if not nifti:
        raise HipsegError(f"{root}: no .nii or .nii.gz files found")
    images, labels = found["image"], found["label"]
    for vid in sorted(set(images) | set(labels)):
        if vid in images and vid in labels:
            search.pairs.append(Pair(vid, images[vid], labels[vid]))
        else:
            lone, missing = (images[vid], "label") if vid in images \
                else (labels[vid], "image")
            search.problems.append(f"{lone.relative_to(root)}: no matching "
                                   f"{missing} file")
    return search


@dataclass
class Volume:
    """A loaded volume: its voxels (x, y, z), affine, voxel size (mm), file
    and header."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path
    header: nib.Nifti1Header

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def orientation(self) -> str:
        """Where each array axis points, e.g. ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))


def load_volume(path: str | os.PathLike, kind: str = "image") -> Volume:
    """One NIfTI file as an image (float32) or a label map (uint8), checked.

    A singleton 4th dimension is dropped; anything else not 3D is refused.
    Labels stored as floats are accepted when every value is an integer.

    Raises:
        HipsegError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise HipsegError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except NIFTI_READ_ERRORS as exc:
        raise HipsegError(f"{path}: not a readable NIfTI file "
                          f"({first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise HipsegError(f"{path}: not a NIfTI file")
    try:  # the voxels are read (and unzipped) here
        if kind == "image":
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:  # as stored: no conversion to float64
            data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError,
            ValueError) as exc:
        raise HipsegError(f"{path}: truncated or corrupt data "
                          f"({first_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise HipsegError(f"{path}: expected a 3D volume, "
                          f"got shape {data.shape}")
    if kind == "image":
        bad = data.size - np.count_nonzero(np.isfinite(data))
        if bad:
            raise HipsegError(f"{path}: {bad} voxels are NaN or infinite")
    else:
        data = _as_labels(data, path)
    x, y, z = (float(s) for s in img.header.get_zooms()[:3])
    return Volume(np.ascontiguousarray(data), img.affine.astype(np.float64),
                  (x, y, z), path, img.header)


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """``data`` as uint8 class numbers, or a one-line error."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise HipsegError(f"{path}: label map has NaN or infinite values")
        rounded = np.rint(data)
        if np.abs(rounded - data).max(initial=0) > 1e-3:
            raise HipsegError(f"{path}: label map has non-integer values")
        data = rounded
    elif data.dtype.kind not in "iub":
        raise HipsegError(f"{path}: label map has dtype {data.dtype}")
    bad = np.unique(data[(data < 0) | (data >= NUM_CLASSES)])
    if bad.size:
        values = ", ".join(str(int(v)) for v in bad[:5])
        raise HipsegError(f"{path}: label values {values} outside "
                          f"0..{NUM_CLASSES - 1}")
    return data.astype(np.uint8)


def constant_image_problem(image: Volume) -> str | None:
    """A problem in words when every voxel has one value, else None."""
    if float(image.array.max()) == float(image.array.min()):
        return (f"{image.path}: constant image "
                f"(every voxel is {float(image.array.min()):g})")
    return None


def pair_problems(image: Volume, label: Volume) -> list[str]:
    """What is wrong between an image and its label: they must share shape
    and affine, and the image must not be constant."""
    problems = []
    if image.shape != label.shape:
        problems.append(f"{label.path}: shape {label.shape} differs from "
                        f"its image {image.shape}")
    elif not np.allclose(image.affine, label.affine, atol=1e-3):
        problems.append(f"{label.path}: affine differs from its image "
                        f"{image.path.name}")
    constant = constant_image_problem(image)
    return problems + ([constant] if constant else [])


def load_pair(pair: Pair) -> tuple[Volume, Volume]:
    """An image and its label, loaded and checked; the first problem is
    raised as a :class:`~hipseg_lib.HipsegError`."""
    image = load_volume(pair.image, "image")
    label = load_volume(pair.label, "label")
    problems = pair_problems(image, label)
    if problems:
        raise HipsegError(problems[0])
    return image, label
