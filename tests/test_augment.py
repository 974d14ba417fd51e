from __future__ import annotations

import numpy as np

from hipseg_lib.augment import (Compose, Crop, Flip, Gamma, RandomPatch, RandomFlip, RandomRotate, Rotate,
                                ScaleShift, default_augmentation)


def _pair():
    img = np.zeros((16, 16, 8), np.float32)
    lab = np.zeros((16, 16, 8), np.uint8)
    img[2:6, 3:9, 1:4] = 1.0
    lab[2:6, 3:9, 1:4] = 3
    return img + 0.1, lab


def test_random_transforms_replay_exactly():
    aug = default_augmentation()
    img, lab = _pair()
    t1 = aug.sample(np.random.default_rng(42))
    t2 = aug.sample(np.random.default_rng(42))
    assert t1 == t2
    a, b = t1(img, lab), t2(img, lab)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    samples = {aug.sample(np.random.default_rng(s)) for s in range(20)}
    assert len(samples) > 5


def test_geometric_transforms_keep_image_and_label_aligned():
    img, lab = _pair()
    for t in (Flip((0,)), Flip((0, 1)), Rotate(90.0), Rotate(7.0), Crop((1, 2, 0), (12, 12, 8))):
        i2, l2 = t(img, lab)
        assert i2.shape == l2.shape and l2.dtype == np.uint8
        assert set(np.unique(l2)) <= {0, 3}
        # Where the label says 3 the image is bright, and vice versa.
        inside = i2[l2 == 3]
        assert inside.size > 0 and inside.mean() > 0.8
        assert np.mean(i2[l2 == 0] > 0.6) < 0.05


def test_flip_and_rotate_known_values():
    img, lab = _pair()
    np.testing.assert_array_equal(Flip((0,))(img, lab)[1], lab[::-1])
    np.testing.assert_array_equal(Rotate(0.0)(img, lab)[1], lab)
    r = Rotate(180.0)(img, lab)[1]
    np.testing.assert_array_equal(r, lab[::-1, ::-1])


def test_crop_pads_outside_and_random_crop_bounds():
    img, lab = _pair()
    i2, l2 = Crop((-2, 0, 0), (4, 4, 4))(img, lab)
    assert i2.shape == (4, 4, 4) and (l2[:2] == 0).all() and (i2[:2] == img.min()).all()
    rc = RandomPatch((8, 8, 8))
    for s in range(10):
        c = rc.sample(np.random.default_rng(s), lab)
        assert 0 <= c.start[0] <= 8 and c.start[2] == 0


def test_random_patch_draws_foreground_at_the_configured_rate():
    """A tiny organ in a large volume: uniform patches rarely hold it, oversampled ones do."""
    lab = np.zeros((64, 64, 32), np.uint8)
    lab[50:53, 5:8, 25:28] = 5
    img = lab.astype(np.float32)
    for fraction in (0.0, 0.33, 1.0):
        patch = RandomPatch((16, 16, 8), foreground_fraction=fraction)
        hits = []
        for s in range(600):
            c = patch.sample(np.random.default_rng(s), lab)
            i2, l2 = c(img, lab)
            assert l2.shape == (16, 16, 8) and np.array_equal(i2 > 0, l2 > 0)
            hits.append((l2 == 5).any())
        uniform_rate = 0.03  # about (16+2)*(16+2)*(8+2) starts of 49*49*25 hold part of the organ
        expected = fraction + (1 - fraction) * uniform_rate
        assert abs(np.mean(hits) - expected) < 0.06, (fraction, np.mean(hits))
    # Centred on the organ even at the volume's border (y 5..7), and never outside the volume.
    for s in range(20):
        c = RandomPatch((16, 16, 8), 1.0).sample(np.random.default_rng(s), lab)
        assert 42 <= c.start[0] <= 44 and c.start[1] == 0 and 21 <= c.start[2] <= 23, c.start
        assert all(0 <= a and a + n <= full for a, n, full in zip(c.start, c.size, lab.shape))


def test_intensity_transforms_leave_label_alone():
    img, lab = _pair()
    img = img + np.linspace(0, 0.5, img.size, dtype=np.float32).reshape(img.shape)
    for t in (Gamma(0.7), ScaleShift(1.2, -0.3)):
        i2, l2 = t(img, lab)
        assert l2 is lab and not np.allclose(i2, img)
    g_img = Gamma(2.0)(img, lab)[0]
    assert np.isclose(g_img.min(), img.min()) and np.isclose(g_img.max(), img.max())


def test_random_flip_probability():
    flips = [RandomFlip((0,), p=0.5).sample(np.random.default_rng(s)).axes for s in range(200)]
    assert 60 < sum(1 for f in flips if f) < 140
    assert RandomRotate(10, p=0.0).sample(np.random.default_rng(0)) == Rotate(0.0)
    img, lab = _pair()
    out_img, out_lab = Compose(())(img.copy(), lab.copy())
    assert np.array_equal(out_img, img) and np.array_equal(out_lab, lab), "no transforms: unchanged"
