"""Atomic writes: a writer that dies half way leaves the old file as it was and no temporary file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hipseg_lib._atomic import save_nifti_atomic
from hipseg_lib.checkpoint import save_checkpoint
from hipseg_lib.model import ModelConfig, ResUNet3D
from hipseg_lib.predictor import InferenceSettings
from hipseg_lib.preprocess import Preprocessing


def _dies_half_way(real):
    """A writer that writes half of what the real one writes, then fails (a full disk, a crash)."""
    def write(obj, path, *a, **k):
        real(obj, path, *a, **k)
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")
    return write


def test_a_checkpoint_write_that_fails_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    import hipseg_lib.checkpoint as C

    cfg = ModelConfig(base_channels=4, depth=3)
    path = save_checkpoint(tmp_path / "last.pth", ResUNet3D(cfg), Preprocessing(), InferenceSettings(), epoch=0)
    before = path.read_bytes()
    monkeypatch.setattr(C.torch, "save", _dies_half_way(torch.save))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, ResUNet3D(cfg), Preprocessing(), InferenceSettings(), epoch=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"], "no temporary file left"


def test_a_nifti_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    import hipseg_lib.io as I

    path = save_nifti_atomic(np.zeros((4, 4, 4), np.uint8), np.eye(4), tmp_path / "pred.nii.gz")
    before = path.read_bytes()
    monkeypatch.setattr(I.nib, "save", _dies_half_way(I.nib.save))
    with pytest.raises(OSError, match="No space left"):
        save_nifti_atomic(np.ones((4, 4, 4), np.uint8), np.eye(4), path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"], "no temporary file left"
