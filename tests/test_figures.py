"""Figures drawn from the real objects: the 3D surfaces of truth and prediction."""
from __future__ import annotations

import numpy as np

from hipseg_lib import BLADDER, BONES, CLASS_NAMES, PROSTATE
from hipseg_lib.surfaces import class_surfaces, surface_turntable, surface_view


def test_surfaces_are_in_millimetres_and_one_per_class_present():
    truth = np.zeros((20, 20, 12), np.uint8)
    truth[4:16, 4:16, 2:10] = BLADDER
    truth[8:12, 8:12, 4:6] = PROSTATE
    pred = truth.copy()
    pred[pred == PROSTATE] = BLADDER  # the prediction misses the prostate
    spacing = (1.5, 1.5, 3.0)
    found = class_surfaces(truth, spacing, step=1)
    assert set(found) == {BLADDER, PROSTATE} and BONES not in found
    verts, faces = found[PROSTATE]
    # the surface runs half a voxel outside the outer voxels: x 8..11 -> 7.5..11.5 voxels, in mm
    np.testing.assert_allclose(verts.min(0), [7.5 * 1.5, 7.5 * 1.5, 3.5 * 3.0], atol=1e-6)
    np.testing.assert_allclose(verts.max(0), [11.5 * 1.5, 11.5 * 1.5, 5.5 * 3.0], atol=1e-6)
    assert faces.max() < len(verts)
    fig = surface_view(truth, pred, spacing)
    drawn = [sorted(c.get_label() for c in ax.collections) for ax in fig.axes[:2]]
    both = sorted([CLASS_NAMES[BLADDER], CLASS_NAMES[PROSTATE]])
    assert drawn == [both, [CLASS_NAMES[BLADDER]]], "each side draws the classes it has"
    assert [ax.get_title() for ax in fig.axes[:2]] == ["truth", "prediction"]


def test_a_part_one_voxel_thin_still_gets_a_surface():
    """Marching cubes on every second voxel can step over a one-voxel-thin part: the surface is
    then taken on every voxel (as the GPU check's tiny dry run met)."""
    thin = np.zeros((12, 12, 12), np.uint8)
    thin[4, 4:12, 3] = BLADDER
    found = class_surfaces(thin, (1.0, 1.0, 1.0), step=2)
    assert set(found) == {BLADDER} and len(found[BLADDER][1]) > 0


def test_turntable_turns_both_sides_in_jpeg_frames_of_a_static_page():
    """The rotating 3D view: one JPEG frame per angle, starting at the still's front view, and
    each frame shows the scene from a new side (the view really turns)."""
    import base64
    import re

    truth = np.zeros((20, 16, 12), np.uint8)
    truth[4:16, 4:9, 2:10] = BLADDER  # not symmetric about the vertical axis: every angle differs
    truth[10:14, 10:14, 3:6] = PROSTATE
    out = surface_turntable(truth, truth, (1.5, 1.5, 3.0), frames=4, size=(4, 2), dpi=40)
    assert out.azimuths == [-100, -10, 80, 170]
    assert out.data.startswith('<div class="hipseg-turntable">')
    frames = re.findall(r'data:image/jpeg;base64,([^"]+)"', out.data)
    assert len(frames) == 4, "one embedded JPEG per angle"
    images = [base64.b64decode(re.sub(r"\\\s", "", f)) for f in frames]
    assert all(im.startswith(b"\xff\xd8") for im in images), "JPEG data"
    assert len(set(images)) == 4, "every angle is a different picture"
    assert "https://" not in out.data, "nothing is fetched from the network"


def test_the_three_views_letter_the_patients_directions_where_the_anatomy_is():
    """A voxel at the patient's left, back and head (the LPS array's far corner) is drawn at the
    edges lettered L, P and S in each plane it shows in."""
    import matplotlib

    matplotlib.use("Agg")
    from hipseg_lib.viz import orthogonal_views

    vol = np.zeros((10, 8, 6), np.float32)
    vol[9, 7, 5] = 1.0  # left, posterior, superior corner
    fig = orthogonal_views(vol, center=(9, 7, 5))
    for ax, (h_edge, v_edge) in zip(fig.axes[:3], [("L", "P"), ("L", "S"), ("P", "S")]):
        shown = np.asarray(ax.images[0].get_array())
        row, col = np.unravel_index(np.argmax(shown), shown.shape)
        letters = {t.get_text(): t.get_position() for t in ax.texts}
        at_right, at_bottom = col == shown.shape[1] - 1, row == shown.shape[0] - 1
        assert (letters[h_edge][0] > 0.5) == at_right, (ax.get_title(), h_edge)
        assert (letters[v_edge][1] < 0.5) == at_bottom, (ax.get_title(), v_edge)


def test_zoom_to_frames_the_mask_with_its_margin():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hipseg_lib.viz import show_slice, zoom_to

    vol = np.zeros((40, 30, 4), np.float32)
    fig, ax = plt.subplots()
    show_slice(ax, vol, index=1)
    mask = np.zeros((40, 30), bool)
    mask[20:25, 5:8] = True  # x 20..24, y 5..7
    zoom_to([ax], mask, margin=2)
    assert ax.get_xlim() == (17.5, 26.5) and ax.get_ylim() == (9.5, 2.5), "y runs down the rows"
    plt.close(fig)
