"""The live slice viewer: frames, controls and what they show (no browser needed)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hipseg_lib import BODY, BONES, PROSTATE
from hipseg_lib.players import SliceViewer


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
    def frame_of(viewer, *view):
        return np.asarray(Image.open(io.BytesIO(viewer.render(*view))).convert("RGB"))

    frame = frame_of(v, "axial", 10, "labels", 0.5)
    assert tuple(frame[14, 14]) != (0, 0, 0), "the prostate is filled"
    assert tuple(frame[10, 10]) == (0, 0, 0), "inside the body the image shows through"
    assert tuple(frame[4, 16]) != (0, 0, 0), "the body's edge is drawn"
    none = frame_of(v, "axial", 10, "labels", 0.0)
    assert not none[14, 14].any(), "opacity 0 shows the image alone"
    w = SliceViewer(img * 0, (lab, lab), ("a", "b"), size=32)
    assert not frame_of(w, "axial", 10, "difference", 1.0).any(), "identical maps: no difference"


def test_static_slider_opens_on_the_prostate_with_mm_labels():
    import re

    from hipseg_lib import PROSTATE
    from hipseg_lib.players import static_slider
    from hipseg_lib.viz import prostate_slice

    image = np.random.default_rng(0).random((24, 24, 40)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4:20, 4:20, 3:37] = BODY
    label[10:14, 10:14, 22:27] = PROSTATE
    label[8:16, 6:18, 5:35] = np.where(label[8:16, 6:18, 5:35] == PROSTATE, PROSTATE, BONES)
    html = static_slider(image, labels=(label,), spacing=(1.0, 1.0, 2.5), max_frames=8)
    k = prostate_slice(label)
    assert html.start == k and k in html.frames
    # every organ slice range is covered, from the first to the last slice holding one
    assert html.frames[0] <= 5 and html.frames[-1] >= 34
    opened = re.findall(r"anim\w+\.set_frame\((\d+)\)", html.data)
    assert opened == [str(html.frames.index(k))]
    assert html.captions[k] == f"axial slice {k} of 40 ({k * 2.5:.1f} mm)"


def test_static_overlay_fills_organs_and_outlines_the_body():
    from hipseg_lib.viz import overlay_rgba

    plane = np.zeros((12, 12), np.uint8)
    plane[1:11, 1:11] = BODY
    plane[4:7, 4:7] = PROSTATE
    rgba = overlay_rgba(plane, alpha=0.4)
    assert rgba[5, 5, 3] == pytest.approx(0.4)          # organ: translucent fill
    assert rgba[1, 5, 3] == 1.0 and rgba[8, 8, 3] == 0  # body: outline only, inside clear
    assert rgba[0, 0, 3] == 0                           # background: clear
