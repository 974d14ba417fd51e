from __future__ import annotations

import numpy as np
import pytest

from hipseg_lib import HipsegError, SettingsError
from hipseg_lib.preprocess import (
    Preprocessing,
    crop,
    foreground_box,
    normalise_intensity,
    preprocess_pair,
    reorient,
    resize_image,
    resize_label,
)


def test_normalise_is_robust_and_gain_invariant():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 20, (16, 16, 8)).astype(np.float32)
    img[0, 0, 0] = 1e6  # a hot voxel must not squash the rest
    a = normalise_intensity(img)
    b = normalise_intensity(img * 3.0 + 50.0)
    assert a.dtype == np.float32
    assert abs(a.mean()) < 1e-4 and abs(a.std() - 1) < 1e-3
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a.max() < 4


def test_normalise_constant_image_is_an_error():
    with pytest.raises(HipsegError, match="scan.nii.gz: constant image"):
        normalise_intensity(np.ones((4, 4, 4)), name="scan.nii.gz")


@pytest.mark.parametrize("depth", [128 // 8, 144 // 8])
def test_resize_keeps_labels_intact(depth):
    label = np.zeros((32, 32, depth), np.uint8)
    label[4:28, 4:28, :] = 1
    label[10:14, 10:14, 3:9] = 5
    out = resize_label(label, (16, 16, 8))
    assert out.shape == (16, 16, 8) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1, 5}
    img = resize_image(label.astype(np.float32), (16, 16, 8))
    assert img.shape == (16, 16, 8) and img.dtype == np.float32
    # linear interpolation stays within the input's range (a cubic spline would overshoot at edges)
    assert 0 <= img.min() and img.max() <= 5


def test_preprocess_pair_and_config():
    cfg = Preprocessing(target_shape=(8, 8, 4))
    img, lab, box = preprocess_pair(np.random.default_rng(0).random((16, 16, 9)), np.ones((16, 16, 9), np.uint8), cfg)
    assert img.shape == lab.shape == (8, 8, 4)
    assert box == ((0, 16), (0, 16), (0, 9)), "nothing stands out of uniform noise: full extent kept"
    assert Preprocessing.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="target_shape"):
        Preprocessing(target_shape=(8, 8))
    with pytest.raises(ValueError, match="clip_percentiles"):
        Preprocessing(clip_percentiles=(50, 10))
    with pytest.raises(ValueError, match="orientation"):
        Preprocessing(orientation="XYZ")


def test_reorient_round_trip_and_spacing():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    ras = np.diag([2.0, 3.0, 4.0, 1.0])
    turn = reorient(ras, "LPS")
    out = turn.apply(arr)
    np.testing.assert_array_equal(out, arr[::-1, ::-1, :])
    np.testing.assert_array_equal(turn.undo(out), arr)
    # A transposed scan (axes S, P, L): axes are permuted, and so is the spacing.
    spl = np.array([[0, 0, -4.0, 0], [0, -3.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    turn2 = reorient(spl, "LPS")
    assert turn2.apply(arr).shape == (4, 3, 2)
    assert turn2.spacing((2.0, 3.0, 4.0)) == (4.0, 3.0, 2.0)
    np.testing.assert_array_equal(turn2.undo(turn2.apply(arr)), arr)


def test_foreground_box_finds_the_body_and_keeps_labels():
    rng = np.random.default_rng(0)
    img = np.abs(rng.normal(0, 0.05, (40, 40, 12))).astype(np.float32)
    img[10:30, 14:26, :] += 0.8  # the body
    label = np.zeros(img.shape, np.uint8)
    label[10:30, 14:26, :] = 1
    label[18:21, 18:21, 4:7] = 5
    box = foreground_box(img)
    # body [10, 30) x [14, 26) plus the 2-voxel margin (and at most 1 voxel of smoothing blur)
    assert 7 <= box[0][0] <= 8 and 32 <= box[0][1] <= 33
    assert 11 <= box[1][0] <= 12 and 28 <= box[1][1] <= 29 and box[2] == (0, 12)
    assert (crop(label, box) == 5).sum() == (label == 5).sum(), "no labelled voxel is cut off"
    cfg = Preprocessing(target_shape=(16, 8, 8))
    x, y, b = preprocess_pair(img, label, cfg)
    assert b == box and x.shape == y.shape == (16, 8, 8) and (y == 5).any()
    whole = preprocess_pair(img, label, Preprocessing(target_shape=(16, 8, 8), crop_foreground=False))[2]
    assert whole == ((0, 40), (0, 40), (0, 12))
    # the crop's rule is part of the stored settings, and the pipeline follows it
    wider = Preprocessing(target_shape=(16, 8, 8), crop_margin=5)
    assert preprocess_pair(img, label, wider)[2][0] == (box[0][0] - 3, box[0][1] + 3)
    assert Preprocessing.from_dict(wider.to_dict()) == wider
    # the crop's percentiles and the intensity clip's are two settings, each kept as given
    assert Preprocessing().clip_percentiles == (0.5, 99.5) and Preprocessing().crop_percentiles == (5.0, 90.0)
    both = Preprocessing(clip_percentiles=(1, 99), crop_percentiles=(10, 80))
    assert (both.clip_percentiles, both.crop_percentiles) == ((1.0, 99.0), (10.0, 80.0))
    with pytest.raises(SettingsError, match="crop_percentiles must be 0 <= low < high"):
        Preprocessing(crop_percentiles=(90.0, 5.0))


def test_the_numpy_resize_is_torchs_trilinear_and_nearest_exact():
    """The preprocessing needs no torch (the exported model's path), yet samples as torch does."""
    import torch

    x = np.random.default_rng(0).random((3, 11, 9, 7)).astype(np.float32)
    ours = resize_image(x, (16, 5, 8))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(16, 5, 8), mode="trilinear",
                                             align_corners=False)[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    lab = np.random.default_rng(1).integers(0, 6, (11, 9, 7)).astype(np.uint8)
    t = torch.nn.functional.interpolate(torch.from_numpy(lab)[None, None], size=(16, 5, 8), mode="nearest-exact")
    np.testing.assert_array_equal(resize_label(lab, (16, 5, 8)), t[0, 0].numpy())
