"""``hipseg convert --to nnunet``: a hipseg data folder as an nnU-Net v2 raw dataset, same split.

nnU-Net v2's raw format (its documentation, ``dataset_format.md``): ``imagesTr/{ID}_0000.nii.gz``
(one file per channel, here one: the T2 scan), ``labelsTr/{ID}.nii.gz``, ``imagesTs/{ID}_0000.nii.gz``
and ``dataset.json`` with ``channel_names``, ``labels`` (name to integer, background 0,
consecutive), ``numTraining`` and ``file_ending``. The identifiers keep the HipMRI case and week
(``Case_004_Week0``). hipseg's own case-level split goes to ``splits_final.json`` as fold 0 (its
training and validation cases; the test cases are in ``imagesTs``, with their truths in
``labelsTs`` for scoring), so that nnU-Net trains and is scored on exactly the same patients:
copy it into ``nnUNet_preprocessed/DatasetNNN_Name/`` after planning and train fold 0.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from . import CLASS_NAMES, HipsegError, OutputExists, __version__, first_line
from .data import split_folder
from .io import NIFTI_READ_ERRORS, Pair

__all__ = ["to_nnunet", "nnunet_identifier", "DATASET_NAME"]

DATASET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_-]*$")  # what nnU-Net accepts


def nnunet_identifier(pair: Pair) -> str:
    """``Case_004_Week0``: the HipMRI case and week, as nnU-Net's case identifier."""
    return f"Case_{pair.id}"


def _check_geometry(pair: Pair) -> None:
    """nnU-Net refuses an image and label whose grids differ: say which pair, before writing."""
    try:
        img, lab = (cast(nib.Nifti1Image, nib.load(p)) for p in (pair.image, pair.label))
    except NIFTI_READ_ERRORS as exc:
        raise HipsegError(f"{pair.image}: unreadable ({first_line(exc, 120)})") from None
    if img.shape != lab.shape:
        raise HipsegError(f"{pair.label}: shape {lab.shape} differs from its image's {img.shape}")
    if not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise HipsegError(f"{pair.label}: its affine differs from its image's (nnU-Net needs the same grid)")


def _put(src: Path, dst: Path) -> None:
    """Copy a ``.nii.gz`` byte for byte; write a ``.nii`` compressed (nnU-Net wants one ending)."""
    if src.name.lower().endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        nib.save(nib.load(src), dst)


def to_nnunet(data_dir: str | os.PathLike, out_dir: str | os.PathLike, split_seed: int = 0,
              overwrite: bool = False) -> dict:
    """Write the nnU-Net v2 raw dataset; returns ``{"train": n, "val": n, "test": n}``.

    ``out_dir`` must be named ``DatasetNNN_Name`` (nnU-Net's rule). The dataset is written into a
    temporary folder beside it and renamed into place at the end, so a failure leaves nothing
    half-written; an existing ``out_dir`` is replaced only with ``overwrite``.
    """
    out = Path(out_dir)
    if not DATASET_NAME.match(out.name):
        raise HipsegError(f"{out}: nnU-Net needs the dataset folder named DatasetNNN_Name "
                          "(three digits, e.g. Dataset501_HipMRI)")
    if out.exists() and not overwrite:
        raise OutputExists(out)
    split = split_folder(data_dir, split_seed)
    for pair in (p for part in split.values() for p in part):
        _check_geometry(pair)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for part, (images, labels) in (("train", ("imagesTr", "labelsTr")), ("val", ("imagesTr", "labelsTr")),
                                       ("test", ("imagesTs", "labelsTs"))):
            for pair in split[part]:
                ident = nnunet_identifier(pair)
                _put(pair.image, tmp / images / f"{ident}_0000.nii.gz")
                _put(pair.label, tmp / labels / f"{ident}.nii.gz")
        n_train = len(split["train"]) + len(split["val"])
        dataset = {"channel_names": {"0": "T2"}, "labels": {name: i for i, name in enumerate(CLASS_NAMES)},
                   "numTraining": n_train, "file_ending": ".nii.gz", "name": out.name,
                   "description": f"HipMRI-layout pelvic MR from {Path(data_dir).resolve().name}, written by "
                                  f"hipseg {__version__} (split seed {split_seed}; test cases in imagesTs)"}
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        folds = [{"train": [nnunet_identifier(p) for p in split["train"]],
                  "val": [nnunet_identifier(p) for p in split["val"]]}]
        (tmp / "splits_final.json").write_text(json.dumps(folds, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {part: len(pairs) for part, pairs in split.items()}
