from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hipseg_lib.augment import (
    ANISO_THRESHOLD,
    AUGMENTATIONS,
    Affine,
    Augmentation,
    Brightness,
    Contrast,
    Crop,
    Gamma,
    GaussianBlur,
    GaussianNoise,
    LowResolution,
    Mirror,
    RandomAugmentation,
    RandomPatch,
    augment_batch,
)


def _pair(shape=(16, 16, 8)):
    """A bright box labelled 3 on a dark, slightly textured background."""
    g = torch.Generator().manual_seed(0)
    img = 0.05 * torch.rand((1, *shape), generator=g)
    lab = torch.zeros(shape, dtype=torch.int64)
    img[0, 2:7, 3:10, 1:5] += 1.0
    lab[2:7, 3:10, 1:5] = 3
    return img, lab


def _affine(angles=(0.0, 0.0, 0.0), scale=1.0, spacing=(1.0, 1.0, 1.0)) -> Affine:
    return Affine.rotation(angles, scale, spacing)


def _identities():
    return [Mirror(()), _affine(), GaussianNoise(0.0, 1), Brightness(1.0), Contrast(1.0), LowResolution(1.0),
            Gamma(1.0), Gamma(1.0, invert=True), Augmentation()]


def test_identity_parameters_give_the_input_back():
    img, lab = _pair()
    for t in _identities():
        i2, l2 = t(img, lab)
        torch.testing.assert_close(i2, img, atol=1e-5, rtol=0, msg=str(t))
        assert torch.equal(l2, lab), t
    i2, l2 = Augmentation()(img, lab)
    assert torch.equal(i2, img) and torch.equal(l2, lab), "the empty augmentation is exact"


def test_rotation_by_90_degrees_equals_rot90_and_flip_equals_flip():
    img, lab = _pair((12, 12, 12))
    i2, l2 = _affine((0.0, 0.0, math.pi / 2))(img, lab)  # about axis 2: in the (0, 1) plane
    torch.testing.assert_close(i2, torch.rot90(img, -1, dims=(1, 2)), atol=1e-5, rtol=0)
    assert torch.equal(l2, torch.rot90(lab, -1, dims=(0, 1)))
    i3, l3 = _affine((math.pi / 2, 0.0, 0.0))(img, lab)  # about axis 0: in the (1, 2) plane
    torch.testing.assert_close(i3, torch.rot90(img, -1, dims=(2, 3)), atol=1e-5, rtol=0)
    assert torch.equal(l3, torch.rot90(lab, -1, dims=(1, 2)))
    for axes in ((0,), (1, 2), (0, 1, 2)):
        i4, l4 = Mirror(axes)(img, lab)
        assert torch.equal(i4, torch.flip(img, [1 + a for a in axes])) and torch.equal(l4, torch.flip(lab, list(axes)))
        i5, l5 = Augmentation(mirror=Mirror(axes))(img, lab)
        assert torch.equal(i5, i4) and torch.equal(l5, l4), "an Augmentation mirrors too"


def test_rotation_turns_the_anatomy_in_millimetres():
    """Voxels of 1 mm along x and 2 mm along y: a box of 8 x 4 voxels is a square of 8 mm, which a
    quarter turn in mm leaves where it is; turning voxels instead would give 4 x 8 voxels."""
    img = torch.zeros(1, 32, 16, 3)
    lab = torch.zeros(32, 16, 3, dtype=torch.int64)
    lab[12:20, 6:10, :] = 2  # centred on the grid's centre
    img[0][lab == 2] = 1.0
    _, l2 = _affine((0.0, 0.0, math.pi / 2), spacing=(1.0, 2.0, 1.0))(img, lab)
    assert torch.equal(l2, lab), "a square in mm is the same square after a quarter turn"
    _, l3 = _affine((0.0, 0.0, math.pi / 2), spacing=(1.0, 1.0, 1.0))(img, lab)
    box = torch.nonzero(l3 == 2)
    assert tuple((box.max(0).values - box.min(0).values + 1)[:2].tolist()) == (4, 8), "voxels turned instead"


def test_label_keeps_its_values_and_moves_with_the_image():
    img = torch.zeros(1, 24, 24, 16)
    lab = torch.zeros(24, 24, 16, dtype=torch.int64)
    lab[3:11, 4:14, 2:8] = 3
    lab[13:21, 13:21, 6:13] = 5
    img[0][lab == 3], img[0][lab == 5] = 1.0, 3.0
    for angles, scale in (((0.1, -0.2, 0.3), 1.0), ((0.0, 0.0, 0.4), 1.3), ((0.0, 0.0, 0.0), 0.8)):
        i2, l2 = _affine(angles, scale)(img, lab)
        assert set(torch.unique(l2).tolist()) <= {0, 3, 5}
        assert (l2 == 5).any() and (l2 == 3).any()
        assert i2[0][l2 == 5].mean() > 2.4 and 0.7 < i2[0][l2 == 3].mean() < 1.5, "the label sits on its organ"
        assert (i2[0][l2 == 0] > 0.6).float().mean() < 0.05
    assert float(_affine((0.0, 0.0, 0.7))(img, lab)[0].min()) >= float(img.min()) - 1e-6, "padded with the minimum"


def test_intensity_transforms_leave_the_label_alone_and_do_what_they_say():
    img, lab = _pair()
    img = img + torch.linspace(0, 0.5, img.numel()).view(img.shape)
    for t in (GaussianNoise(0.1, 7), GaussianBlur((0.8, 0.8, 0.8)), Brightness(1.2), Contrast(1.3),
              LowResolution(0.5), Gamma(1.4), Gamma(0.7, invert=True)):
        i2, l2 = t(img, lab)
        assert l2 is lab and i2.shape == img.shape and not torch.allclose(i2, img), t
    torch.testing.assert_close(Brightness(1.2)(img, lab)[0], img * 1.2)
    c = Contrast(1.5)(img, lab)[0]
    assert c.min() >= img.min() - 1e-6 and c.max() <= img.max() + 1e-6, "contrast keeps the range"
    g = Gamma(1.4)(img, lab)[0]
    torch.testing.assert_close(g.mean(), img.mean(), atol=1e-4, rtol=0)
    torch.testing.assert_close(g.std(), img.std(), atol=1e-4, rtol=0)
    noise = GaussianNoise(0.1, 7)(img, lab)[0] - img
    assert abs(float(noise.std()) - 0.1) < 0.01
    torch.testing.assert_close(GaussianBlur((0.8, 0.8, 0.8))(img, lab)[0].mean(), img.mean(), atol=2e-3, rtol=0)


def test_replaying_a_sampled_augmentation_gives_identical_output():
    aug = RandomAugmentation(p_rotation=1.0, p_scaling=1.0, p_noise=1.0, p_blur=1.0, p_brightness=1.0,
                             p_contrast=1.0, p_low_resolution=1.0, p_gamma_inverted=1.0, p_gamma=1.0, p_mirror=1.0)
    t1 = aug.sample(np.random.default_rng([3, 1, 4]), (1.8, 1.8, 2.0))
    t2 = aug.sample(np.random.default_rng([3, 1, 4]), (1.8, 1.8, 2.0))
    assert t1 == t2 and t1.spatial is not None and len(t1.intensity) == 7 and t1.mirror.axes == (0,)
    img, lab = _pair()
    a, b = t1(img, lab), t2(img, lab)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert t1 != aug.sample(np.random.default_rng([3, 2, 4]), (1.8, 1.8, 2.0))


def test_batch_augmentation_equals_sample_by_sample():
    aug = RandomAugmentation(p_rotation=0.5, p_scaling=0.5)
    imgs = torch.stack([_pair()[0], _pair()[0].flip(1)])
    labs = torch.stack([_pair()[1], _pair()[1].flip(0)])
    ts = [aug.sample(np.random.default_rng(s), (1.0, 1.0, 1.0)) for s in (0, 1)]
    assert ts[0].spatial is not None and ts[1].spatial is None, "the batch mixes resampled and plain samples"
    bi, bl = augment_batch(imgs, labs, ts)
    for k in range(2):
        image, label = ts[k](imgs[k], labs[k])
        torch.testing.assert_close(bi[k], image, atol=1e-5, rtol=0)
        assert torch.equal(bl[k], label)
    with pytest.raises(ValueError, match="1 augmentations for a batch of 2"):
        augment_batch(imgs, labs, ts[:1])


def test_sampling_follows_nnunet_probabilities_and_thick_slices_rotate_in_plane():
    aug = RandomAugmentation()
    draws = [aug.sample(np.random.default_rng(s), (1.8, 1.8, 2.0)) for s in range(2000)]
    spatial = np.mean([d.spatial is not None for d in draws])
    assert abs(spatial - (1 - 0.8 * 0.8)) < 0.04, spatial  # rotation 0.2 or scaling 0.2
    gammas = np.mean([any(isinstance(t, Gamma) and not t.invert for t in d.intensity) for d in draws])
    assert abs(gammas - 0.3) < 0.04
    mirrored = np.mean([bool(d.mirror.axes) for d in draws])
    assert abs(mirrored - 0.5) < 0.04
    thick = (1.0, 1.0, 1.0 * ANISO_THRESHOLD * 1.5)
    angles = [aug.rotation_angles(np.random.default_rng(s), thick) for s in range(200)]
    assert all(a[0] == 0.0 and a[1] == 0.0 for a in angles), "only about the thick axis"
    assert max(abs(a[2]) for a in angles) > math.radians(90), "in-plane rotation over the full circle"
    narrow = RandomAugmentation(max_inplane_rotation_degrees=10.0)
    angles = [narrow.rotation_angles(np.random.default_rng(s), thick) for s in range(200)]
    assert max(abs(a[2]) for a in angles) <= math.radians(10) < 2 * max(abs(a[2]) for a in angles)
    light = [AUGMENTATIONS["light"].rotation_angles(np.random.default_rng(s), thick) for s in range(200)]
    assert max(max(abs(v) for v in a) for a in light) <= math.radians(10), "light rotates 10 degrees at most"
    iso = [aug.rotation_angles(np.random.default_rng(s), (1.8, 1.8, 2.0)) for s in range(200)]
    assert max(max(abs(v) for v in a) for a in iso) <= math.radians(30) and min(abs(a[0]) for a in iso) < 0.1
    with pytest.raises(ValueError, match="p_gamma must be in"):
        RandomAugmentation(p_gamma=1.5)


def test_crop_pads_outside_and_random_patch_bounds():
    img, lab = _pair()
    i2, l2 = Crop((-2, 0, 0), (4, 4, 4))(img, lab)
    assert i2.shape == (1, 4, 4, 4) and (l2[:2] == 0).all() and (i2[0, :2] == img.min()).all()
    rc = RandomPatch((8, 8, 8))
    for s in range(10):
        c = rc.sample(np.random.default_rng(s), lab)
        assert 0 <= c.start[0] <= 8 and c.start[2] == 0


def test_random_patch_draws_foreground_at_the_configured_rate():
    """A tiny organ in a large volume: uniform patches rarely hold it, oversampled ones do."""
    lab = torch.zeros((64, 64, 32), dtype=torch.int64)
    lab[50:53, 5:8, 25:28] = 5
    img = lab[None].float()
    for fraction in (0.0, 0.33, 1.0):
        patch = RandomPatch((16, 16, 8), foreground_fraction=fraction)
        hits = []
        for s in range(600):
            c = patch.sample(np.random.default_rng(s), lab)
            i2, l2 = c(img, lab)
            assert l2.shape == (16, 16, 8) and torch.equal(i2[0] > 0, l2 > 0)
            hits.append(bool((l2 == 5).any()))
        uniform_rate = 0.03  # about (16+2)*(16+2)*(8+2) starts of 49*49*25 hold part of the organ
        expected = fraction + (1 - fraction) * uniform_rate
        assert abs(np.mean(hits) - expected) < 0.06, (fraction, np.mean(hits))
    for s in range(20):
        c = RandomPatch((16, 16, 8), 1.0).sample(np.random.default_rng(s), lab)
        assert 42 <= c.start[0] <= 44 and c.start[1] == 0 and 21 <= c.start[2] <= 23, c.start
