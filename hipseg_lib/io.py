"""Finding, pairing, loading and validating HipMRI-style NIfTI volumes.

Two real layouts are recognised (see the README):

* CSIRO release: ``semantic_MRs_anon/Case_004_Week0_LFOV.nii.gz`` with
  ``semantic_labels_anon/Case_004_Week0_SEMANTIC_LFOV.nii.gz``;
* re-shared copy: ``semantic_MRs/B006_Week0_LFOV.nii.gz`` with
  ``semantic_labels_only/B006_Week0_SEMANTIC.nii.gz``.

Images and labels are paired by the parsed (case, week), never by sorting two lists.
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

# What nibabel raises for a file that is not a readable NIfTI: a bad header or magic, a damaged
# gzip stream, a truncated file.
NIFTI_READ_ERRORS = (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, ValueError, OSError,
                     EOFError, zlib.error, gzip.BadGzipFile, struct.error)

__all__ = [
    "VolumeId",
    "Pair",
    "PairSearch",
    "Volume",
    "parse_volume_name",
    "volume_id_in",
    "is_nifti",
    "find_pairs",
    "load_volume",
    "load_pair",
    "pair_problems",
    "constant_image_problem",
]

# The one place HipMRI names are parsed: a case (optionally "Case_" and a letter) and a week.
_ID_PATTERN = r"(?:Case_)?(?P<case>[A-Za-z]?\d+)_Week(?P<week>\d+)"
_NAME_RE = re.compile("^" + _ID_PATTERN + r"(?P<semantic>_SEMANTIC)?(?:_LFOV)?\.nii(?:\.gz)?$")
_ID_RE = re.compile(_ID_PATTERN)
_SKIP_DIRS = {"keras_slices_data", ".ipynb_checkpoints", "__MACOSX"}


@dataclass(frozen=True, order=True)
class VolumeId:
    """Identity of one scan: patient case and week.

    Example:
        >>> parse_volume_name("Case_004_Week0_SEMANTIC_LFOV.nii.gz")
        (VolumeId(case='004', week=0), 'label')
    """

    case: str
    week: int

    def __str__(self) -> str:
        return f"{self.case}_Week{self.week}"


@dataclass(frozen=True)
class Pair:
    """An image file and its label file for one :class:`VolumeId`."""

    id: VolumeId
    image: Path
    label: Path


@dataclass
class PairSearch:
    """What :func:`find_pairs` found: matched pairs and the files it could not use."""

    root: Path
    pairs: list[Pair] = field(default_factory=list)
    unmatched: list[Path] = field(default_factory=list)
    unrecognised: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = [f"{self._rel(p)}: no matching {self._other(p)} file" for p in self.unmatched]
        out += [f"{self._rel(p)}: name is not <Case>_Week<N>[_SEMANTIC][_LFOV].nii[.gz]"
                for p in self.unrecognised]
        out += [f"{self._rel(p)}: a second file for the same case and week" for p in self.duplicates]
        return out

    def _rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    @staticmethod
    def _other(p: Path) -> str:
        return "image" if _is_label_path(p) else "label"


@dataclass
class Volume:
    """A loaded volume: voxel array (x, y, z), affine, voxel spacing in mm and source path."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path
    header: nib.Nifti1Header | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def is_nifti(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz``."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _is_label_path(path: Path) -> bool:
    return "_SEMANTIC" in path.name.upper() or "label" in path.parent.name.lower()


def parse_volume_name(path: str | os.PathLike) -> tuple[VolumeId, str] | None:
    """Parse a HipMRI file name into its (case, week) and kind (``"image"`` or ``"label"``).

    Args:
        path: a file path or name such as ``B006_Week0_SEMANTIC.nii.gz``.

    Returns:
        ``(VolumeId, kind)`` or ``None`` when the name does not follow either layout.

    Example:
        >>> parse_volume_name("semantic_MRs/B006_Week3_LFOV.nii.gz")
        (VolumeId(case='B006', week=3), 'image')
    """
    p = Path(path)
    m = _NAME_RE.match(p.name)
    if not m:
        return None
    kind = "label" if (m.group("semantic") or "label" in p.parent.name.lower()) else "image"
    return VolumeId(m.group("case"), int(m.group("week"))), kind


def volume_id_in(name: str) -> VolumeId | None:
    """The case and week named anywhere in a file name, such as a prediction's, or None.

    Example:
        >>> volume_id_in("Case_004_Week0_LFOV_pred.nii.gz")
        VolumeId(case='004', week=0)
    """
    m = _ID_RE.search(name)
    return VolumeId(m.group("case"), int(m.group("week"))) if m else None


def find_pairs(root: str | os.PathLike) -> PairSearch:
    """Find image/label pairs under ``root`` (either real layout, or a flat folder).

    Args:
        root: the data folder, e.g. ``HipMRI_study_complete_release_v1``.

    Raises:
        HipsegError: when ``root`` is missing, not a folder, or holds no NIfTI file.

    Example:
        >>> search = find_pairs("data/synthetic")  # doctest: +SKIP
        >>> len(search.pairs), search.problems  # doctest: +SKIP
    """
    root = Path(root)
    if not root.exists():
        raise HipsegError(f"{root}: no such folder")
    if not root.is_dir():
        raise HipsegError(f"{root}: not a folder")
    search = PairSearch(root=root)
    images: dict[VolumeId, Path] = {}
    labels: dict[VolumeId, Path] = {}
    found_any = False
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not is_nifti(path):
                continue
            found_any = True
            parsed = parse_volume_name(path)
            if parsed is None:
                search.unrecognised.append(path)
                continue
            vid, kind = parsed
            table = labels if kind == "label" else images
            if vid in table:
                search.duplicates.append(path)
            else:
                table[vid] = path
    if not found_any:
        raise HipsegError(f"{root}: no .nii or .nii.gz files found")
    for vid in sorted(set(images) | set(labels)):
        if vid in images and vid in labels:
            search.pairs.append(Pair(vid, images[vid], labels[vid]))
        else:
            search.unmatched.append(images.get(vid) or labels[vid])
    return search


def load_volume(path: str | os.PathLike, kind: str = "image") -> Volume:
    """Load one NIfTI volume as an image (float32) or a label map (uint8).

    A singleton 4th dimension is dropped; anything else that is not 3D is refused.
    Label maps stored as floats are accepted when every value is an integer in 0..5.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: ``"image"`` or ``"label"``.

    Raises:
        HipsegError: a one-line message naming the file and the problem.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise HipsegError(f"{path}: no such file")
    if path.is_dir():
        raise HipsegError(f"{path}: is a folder, expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(path))
    except NIFTI_READ_ERRORS as exc:
        raise HipsegError(f"{path}: not a readable NIfTI file ({first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise HipsegError(f"{path}: not a NIfTI file (found {type(img).__name__})")
    try:
        if kind == "image":
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise HipsegError(f"{path}: truncated or corrupt data ({first_line(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise HipsegError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    if kind == "image":
        if not np.all(np.isfinite(data)):
            n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
            raise HipsegError(f"{path}: {n} voxels are NaN or infinite")
        data = np.ascontiguousarray(data, dtype=np.float32)
    else:
        data = _as_label_array(data, path)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(data, np.asarray(img.affine, dtype=np.float64), spacing, path, img.header)  # type: ignore[arg-type]


def _as_label_array(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise HipsegError(f"{path}: label map has NaN or infinite values")
        rounded = np.rint(data)
        if np.any(np.abs(rounded - data) > 1e-3):
            raise HipsegError(f"{path}: label map has non-integer values")
        data = rounded
    elif data.dtype.kind not in "iub":
        raise HipsegError(f"{path}: label map has unsupported dtype {data.dtype}")
    lo, hi = (data.min(), data.max()) if data.size else (0, 0)
    if lo < 0 or hi >= NUM_CLASSES:
        bad = np.unique(data[(data < 0) | (data >= NUM_CLASSES)])[:5]
        raise HipsegError(
            f"{path}: label values {', '.join(str(int(v)) for v in bad)} outside 0..{NUM_CLASSES - 1}"
        )
    return np.ascontiguousarray(data, dtype=np.uint8)


def pair_problems(image: Volume, label: Volume) -> list[str]:
    """Problems between an image and its label: shape and affine must agree, image not constant."""
    problems = []
    if image.shape != label.shape:
        problems.append(f"{label.path}: shape {label.shape} differs from its image {image.shape}")
    elif not np.allclose(image.affine, label.affine, atol=1e-3):
        problems.append(f"{label.path}: affine differs from its image {image.path.name}")
    constant = constant_image_problem(image)
    if constant:
        problems.append(constant)
    return problems


def constant_image_problem(image: Volume) -> str | None:
    """A one-line problem when every voxel of ``image`` has the same value, else None."""
    if float(image.array.max()) == float(image.array.min()):
        return f"{image.path}: constant image (every voxel is {float(image.array.min()):g})"
    return None


def load_pair(pair: Pair) -> tuple[Volume, Volume]:
    """Load and validate a pair; raise :class:`HipsegError` on the first problem."""
    image = load_volume(pair.image, "image")
    label = load_volume(pair.label, "label")
    problems = pair_problems(image, label)
    if problems:
        raise HipsegError(problems[0])
    return image, label
