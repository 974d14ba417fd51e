from __future__ import annotations

import numpy as np
import pytest

from hipseg_lib.folders import summarise
from hipseg_lib.metrics import average_surface_distance, dice_per_class, evaluate_case, hd95, iou_per_class


def test_dice_iou_known_values_and_absent_class_is_nan():
    truth = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    d = dice_per_class(pred, truth, 4)
    np.testing.assert_allclose(d[:3], [2 * 1 / (2 + 2), 2 * 2 / (3 + 3), 1.0])
    assert np.isnan(d[3]), "a class in neither truth nor prediction is excluded, not a free 1.0"
    iou = iou_per_class(pred, truth, 4)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 4, 1.0])
    # Present in one only: 0, not NaN.
    assert dice_per_class(np.array([3, 0]), np.array([0, 0]), 4)[3] == 0.0


def test_hd95_and_asd_in_millimetres():
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b[5:10, 5:10, 7:12] = True  # shifted 2 voxels along z
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(5.0)  # spacing matters
    # The average surface distance, counted by hand over a's 98 surface voxels (6-connected border):
    # the z=5 face (25 voxels) lies 2 from b's z=7 face, the z=6 ring (16) lies 1 from it, the z=7
    # and z=8 rings (32) are b's own side walls, and of the z=9 face (inside b) the ring (16) is on
    # b's walls while the 3x3 middle is 1 from a wall (8 voxels) or 2 (its centre). Sum 76; b's
    # surface to a's is the mirror image, so the symmetric mean over both surfaces is 152/196.
    assert average_surface_distance(a, b, (1, 1, 1)) == pytest.approx(76 / 98)
    assert average_surface_distance(a, a, (1, 1, 1)) == 0.0


def test_distances_for_missing_structures():
    a = np.zeros((10, 10, 10), bool)
    b = a.copy()
    b[2:4, 2:4, 2:4] = True
    assert np.isnan(hd95(a, a, (1, 1, 1)))
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(np.linalg.norm([10, 10, 20]))


def test_evaluate_case_and_summary():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:8] = 1
    pred = truth.copy()
    pred[2:4, 2:4, 2:4] = 2
    m = evaluate_case(pred, truth, (1, 1, 1), num_classes=3)
    assert set(m) == {"dice", "iou", "hd95", "asd", "nsd"}
    assert m["dice"][2] == 0.0 and np.isnan(evaluate_case(truth, truth, (1, 1, 1), 3)["dice"][2])
    assert m["nsd"][2] == 0.0, "an invented organ has no surface within the tolerance"
    assert np.isnan(evaluate_case(truth, truth, (1, 1, 1), 3)["nsd"][2]) and m["nsd"][1] > 0.5
    s = summarise([m, evaluate_case(truth, truth, (1, 1, 1), 3)], class_names=("bg", "a", "b"))
    assert s["dice"]["b"]["n"] == 1 and s["dice"]["b"]["mean"] == 0.0
    # class a: 216 true voxels, 208 predicted, all inside: Dice 416/424 on one case, 1.0 on the other
    assert s["dice"]["a"]["n"] == 2
    assert s["dice"]["a"]["mean"] == pytest.approx((416 / 424 + 1.0) / 2)


def _labels(rng, shape):
    """A 3-class map of irregular, several-piece regions: smoothed noise cut at two levels."""
    from scipy import ndimage
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return np.digitize(field, np.quantile(field, [0.6, 0.85])).astype(np.uint8)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.1, 2.5)])
def test_hd95_and_asd_equal_monai(spacing):
    """Irregular shapes and anisotropic voxels, where definitions part (which percentile, whether
    the two directions are pooled or averaged, which voxels count as surface): hipseg's numbers
    are MONAI's ``compute_hausdorff_distance(percentile=95)`` and symmetric
    ``compute_average_surface_distance``, per class of a multi-class map as ``evaluate_case``
    computes them."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    import warnings
    rng = np.random.default_rng(7)
    shape = (30, 28, 20)
    truth = _labels(rng, shape)
    pred = np.where(rng.random(shape) < 0.9, truth, _labels(rng, shape))  # a tenth of voxels wrong
    assert all((truth == c).any() and (pred == c).any() for c in (1, 2))

    def onehot(x):
        return torch.nn.functional.one_hot(torch.as_tensor(x, dtype=torch.long), 3).permute(3, 0, 1, 2)[None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a MONAI deprecation inside its own code
        m_hd = metrics.compute_hausdorff_distance(onehot(pred), onehot(truth), percentile=95,
                                                  spacing=spacing)[0].numpy()
        m_asd = metrics.compute_average_surface_distance(onehot(pred), onehot(truth), symmetric=True,
                                                         spacing=spacing)[0].numpy()
        m_nsd = metrics.compute_surface_dice(onehot(pred), onehot(truth), class_thresholds=[2.0, 2.0],
                                             spacing=spacing)[0].numpy()
    ours = evaluate_case(pred, truth, spacing, num_classes=3)
    np.testing.assert_allclose(ours["nsd"][1:], m_nsd, rtol=1e-5)
    assert 0.2 < m_nsd.min() and m_nsd.max() < 0.99, "a tolerance that cuts through the distances"
    np.testing.assert_allclose(ours["hd95"][1:], m_hd, rtol=1e-5)
    np.testing.assert_allclose(ours["asd"][1:], m_asd, rtol=1e-5)
    for c in (1, 2):
        assert hd95(pred == c, truth == c, spacing) == pytest.approx(float(m_hd[c - 1]), rel=1e-5)
        assert average_surface_distance(pred == c, truth == c, spacing) == pytest.approx(
            float(m_asd[c - 1]), rel=1e-5)


def test_a_bootstrap_over_identical_patients_has_zero_width():
    from hipseg_lib.metrics import bootstrap_interval

    low, high = bootstrap_interval(np.tile([[0.8, 0.6]], (4, 1)))
    np.testing.assert_allclose(low, [0.8, 0.6])
    np.testing.assert_allclose(high, [0.8, 0.6])


def test_the_interval_resamples_patients_not_volumes():
    """Four patients of five weekly volumes each, the volumes of one patient nearly alike: the
    patient is the unit. Its interval is wider than one that (wrongly) resamples the 20 volumes as if
    they were independent; and the mean over patients weighs each patient once."""
    from hipseg_lib.metrics import bootstrap_interval, per_patient_summary

    rng = np.random.default_rng(0)
    level = {"p1": 0.60, "p2": 0.75, "p3": 0.85, "p4": 0.95}
    rows = [{"case": case, "metrics": {"dice": np.array([1.0, v + rng.normal(0, 0.005), 0.9, 0.9, 0.9, 0.9])}}
            for case, v in level.items() for _ in range(5)]
    rows += [{"case": "p4", "metrics": {"dice": np.array([1.0, 0.95, 0.9, 0.9, 0.9, 0.9])}}]  # p4: one more
    body = per_patient_summary(rows, "dice")["body"]
    volumes = np.array([[r["metrics"]["dice"][1]] for r in rows])
    v_low, v_high = bootstrap_interval(volumes)
    assert body["high"] - body["low"] > 1.5 * float(v_high[0] - v_low[0])
    assert body["mean"] == pytest.approx(np.mean(list(level.values())), abs=0.005)
    assert set(body["patients"]) == set(level) and body["volume_mean"] > body["mean"]
