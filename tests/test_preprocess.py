from __future__ import annotations

import numpy as np
import pytest

from hipseg_lib import HipsegError
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
    img, lab, where = preprocess_pair(np.random.default_rng(0).random((16, 16, 9)), np.ones((16, 16, 9), np.uint8), cfg)
    box = where.box
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
    box = foreground_box(img, margin=2)
    # body [10, 30) x [14, 26) plus the 2-voxel margin (and at most 1 voxel of smoothing blur)
    assert 7 <= box[0][0] <= 8 and 32 <= box[0][1] <= 33
    assert 11 <= box[1][0] <= 12 and 28 <= box[1][1] <= 29 and box[2] == (0, 12)
    assert (crop(label, box) == 5).sum() == (label == 5).sum(), "no labelled voxel is cut off"
    cfg = Preprocessing(target_shape=(16, 8, 8))
    x, y, b = preprocess_pair(img, label, cfg)
    assert b.box == box and x.shape == y.shape == (16, 8, 8) and (y == 5).any()
    whole = preprocess_pair(img, label, Preprocessing(target_shape=(16, 8, 8), crop_foreground=False))[2]
    assert whole.box == ((0, 40), (0, 40), (0, 12))


def _box_scan(spacing, size_mm=(60.0, 40.0, 30.0), fov_mm=(150.0, 120.0, 90.0)):
    """A bright box of ``size_mm`` (labelled 5) centred in a dark field of view, sampled at ``spacing``."""
    shape = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    centre = [(n * s) / 2 for n, s in zip(shape, spacing)]
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    inside = np.ones(shape, bool)
    for k, (a, c, h) in enumerate(zip(axes, centre, size_mm)):
        view = [1, 1, 1]
        view[k] = -1
        inside &= (np.abs(a - c) < h / 2).reshape(view)
    rng = np.random.default_rng(0)
    image = np.where(inside, 100.0, 5.0) + rng.normal(0, 1, shape)
    return image.astype(np.float32), np.where(inside, 5, 0).astype(np.uint8)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.8, 3.0), (0.7, 2.2, 1.3)])
def test_resampling_to_a_spacing_keeps_sizes_in_mm(spacing):
    """resample="spacing": a box of known size in mm keeps its size in mm on the grid (to one
    voxel), whatever the scan's voxel size; resample="shape" stretches it by the scan's crop."""
    target = (2.0, 2.0, 2.5)
    image, label = _box_scan(spacing)
    cfg = Preprocessing(target_shape=(96, 80, 48), resample="spacing", target_spacing=target)
    img, lab, where = preprocess_pair(image, label, cfg, spacing)
    assert img.shape == lab.shape == (96, 80, 48) and not any(where.cut)
    assert where.crop_spacing(spacing) == pytest.approx(target, rel=0.02)
    idx = np.nonzero(lab == 5)
    extent_mm = [(i.max() - i.min() + 1) * t for i, t in zip(idx, target)]
    for got, want, t in zip(extent_mm, (60.0, 40.0, 30.0), target):
        assert abs(got - want) <= t + 1e-6, (extent_mm, spacing)


def test_a_prediction_grid_is_training_s_grown_to_the_divisor_and_undone_to_the_scans_crop():
    """With ``divisor`` (prediction) the resampled crop is centred in training's grid, grown to
    multiples of the divisor along an axis where the crop is larger (nothing cut); where it fits,
    the network gets exactly what training gave it (the same air around the body, so the same
    instance-norm statistics). Placement.from_grid takes back exactly the crop, so resizing it to
    the box returns the input grid."""
    from hipseg_lib.preprocess import preprocess_image, resize_image

    spacing = (1.5, 0.8, 3.0)
    image, _ = _box_scan(spacing)
    roomy = Preprocessing(target_shape=(96, 96, 48), resample="spacing", target_spacing=(2.0, 2.0, 2.5))
    trained, _ = preprocess_image(image, roomy, spacing)
    predicted, _ = preprocess_image(image, roomy, spacing, divisor=8)
    np.testing.assert_array_equal(predicted, trained)
    cfg = Preprocessing(target_shape=(32, 32, 16), resample="spacing", target_spacing=(2.0, 2.0, 2.5))
    x, where = preprocess_image(image, cfg, spacing, divisor=8)
    assert x.shape == tuple(max(t, -(-r // 8) * 8) for t, r in zip(cfg.target_shape, where.resampled))
    assert any(r > t for r, t in zip(where.resampled, cfg.target_shape)), "an axis grows past training's"
    from hipseg_lib.preprocess import place

    marked = place(np.ones(where.resampled, np.float32), x.shape)  # where the crop went
    assert where.from_grid(marked).shape == where.resampled and where.from_grid(marked).min() == 1.0
    crop_shape = tuple(b - a for a, b in where.box)
    back = resize_image(where.from_grid(x), crop_shape)
    assert back.shape == crop_shape
    # the same in training: a grid too small cuts (and says so), and such a grid cannot be put back
    _, small = preprocess_image(image, cfg, spacing)
    assert any(small.cut)
    with pytest.raises(ValueError, match="cut"):
        small.from_grid(np.zeros(small.grid))
