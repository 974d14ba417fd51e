from __future__ import annotations

import numpy as np
import pytest

from hipseg_lib.metrics import average_surface_distance, dice_per_class, evaluate_case, hd95, iou_per_class, summarise


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
    asd = average_surface_distance(a, b, (1, 1, 1))
    assert 0 < asd < 2.0


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
    assert set(m) == {"dice", "iou", "hd95", "asd"}
    assert m["dice"][2] == 0.0 and np.isnan(evaluate_case(truth, truth, (1, 1, 1), 3)["dice"][2])
    s = summarise([m, evaluate_case(truth, truth, (1, 1, 1), 3)], class_names=("bg", "a", "b"))
    assert s["dice"]["b"]["n"] == 1 and s["dice"]["b"]["mean"] == 0.0
    assert s["dice"]["a"]["n"] == 2 and 0.9 < s["dice"]["a"]["mean"] < 1.0
