"""Atomic file writes: a temporary file in the destination folder, fsync, then rename.

A process killed at any moment leaves either the old complete file or the new complete
file at the destination, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from . import HipsegError, OutputExists

__all__ = ["atomic_path", "write_json_atomic", "save_nifti_atomic"]


def _umask() -> int:
    """The process's umask, read without changing it where the system can tell it (Linux's
    /proc); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it replaces ``path``.

    Raises:
        HipsegError: the folder cannot be written.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    except OSError as exc:
        raise HipsegError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(doc: dict, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{path.parent}: cannot write here ({exc.strerror})") from None
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2))
    return path


def save_nifti_atomic(array: np.ndarray, affine: np.ndarray,
                      path: str | os.PathLike,
                      header: nib.Nifti1Header | None = None,
                      overwrite: bool = False,
                      scale: float | None = None) -> Path:
    """Write a NIfTI file so that a crash never leaves a partial file at
    ``path``.

    The data go to a temporary file in the same folder, which is then
    renamed. ``scale`` stores ``array`` as it is with that scale factor
    (scl_slope), so readers get ``array * scale``.

    Raises:
        HipsegError: the file exists and ``overwrite`` is false, or the
            folder is not writable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(path)
    img = nib.Nifti1Image(array, affine, header=header)
    if header is not None:
        img.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    if scale is not None:
        img.header.set_slope_inter(scale, 0)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return path
