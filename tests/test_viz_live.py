"""The live slice viewer: frames, controls and what they show (no browser needed)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from hipseg_lib.viz import SliceViewer


def _case():
    img = np.linspace(0, 1, 32 * 32 * 16, dtype=np.float32).reshape(32, 32, 16)
    lab = np.zeros((32, 32, 16), np.uint8)
    lab[4:28, 4:28, :] = 1
    lab[12:16, 12:16, 9:12] = 5
    return img, lab


def test_viewer_opens_on_the_prostate_and_moves():
    img, lab = _case()
    pred = lab.copy()
    pred[12:16, 12:16, 9] = 1
    v = SliceViewer(img, (lab, pred), ("truth", "prediction"), spacing=(2.0, 2.0, 3.0), size=128)
    assert v.which.options == ("truth", "prediction", "difference")
    assert v.slider.value == 9 and v.slider.continuous_update
    assert v.caption.value == "axial slice 9 of 16 (27.0 mm)"
    first = v.frame.value
    v.slider.value = 3
    assert v.frame.value != first and v.caption.value.startswith("axial slice 3 of 16")
    v.plane.value = "sagittal"
    assert v.slider.max == 31 and v.caption.value.startswith("sagittal slice 12 of 32")
    # Physical aspect: sagittal rows are 3 mm slices, columns 2 mm voxels.
    png = Image.open(io.BytesIO(v.frame.value))
    assert png.size == (128, 96) and (v.frame.width, v.frame.height) == ("128", "96")


def test_overlay_shows_organs_filled_body_outlined_and_differences():
    img, lab = _case()
    v = SliceViewer(img * 0, (lab,), ("labels",), size=32)
    frame = v._compose("axial", 10, "labels", 0.5)
    assert tuple(frame[14, 14]) != (0, 0, 0), "the prostate is filled"
    assert tuple(frame[10, 10]) == (0, 0, 0), "inside the body the image shows through"
    assert tuple(frame[4, 16]) != (0, 0, 0), "the body's edge is drawn"
    none = v._compose("axial", 10, "labels", 0.0)
    assert not none[14, 14].any(), "opacity 0 shows the image alone"
    w = SliceViewer(img * 0, (lab, lab), ("a", "b"), size=32)
    assert not w._compose("axial", 10, "difference", 1.0).any(), "identical maps: no difference"
