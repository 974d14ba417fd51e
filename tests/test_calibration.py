"""Calibration: the reliability of predicted probabilities, and a case-level uncertainty signal."""
from __future__ import annotations

import numpy as np

from hipseg_lib.calibration import expected_calibration_error, organ_uncertainty, rank_correlation, reliability_counts


def _two_class(confidence: np.ndarray, right: np.ndarray):
    """Probabilities of 2 classes whose arg-max is class 0 with ``confidence``; truth 0 where ``right``."""
    probs = np.stack([confidence, 1 - confidence])
    return probs, np.where(right, 0, 1)


def test_calibrated_probabilities_have_an_ece_near_zero_and_overconfident_ones_do_not():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 200_000)
    right = rng.random(confidence.size) < confidence  # right exactly as often as it says
    ece = expected_calibration_error(reliability_counts(*_two_class(confidence, right)))
    assert ece < 0.01
    bold = np.clip(0.5 + 1.8 * (confidence - 0.5), 0.5, 0.999)  # the same predictions, said more surely
    bold_ece = expected_calibration_error(reliability_counts(*_two_class(bold, right)))
    assert bold_ece > 0.05 > ece


def test_the_region_limits_what_is_counted():
    probs, truth = _two_class(np.array([0.99, 0.99, 0.6]), np.array([True, True, False]))
    counts = reliability_counts(probs, truth, region=np.array([False, False, True]))
    assert counts[:, 2].sum() == 1 and abs(expected_calibration_error(counts) - 0.6) < 1e-6


def test_organ_uncertainty_and_its_rank_correlation_with_dice():
    unc = organ_uncertainty(np.array([0.2, 0.4, 0.9, 0.1]), np.array([1, 1, 3, 0]), (1, 2, 3))
    np.testing.assert_allclose(unc, [0.3, np.nan, 0.9])
    rho, n = rank_correlation([0.1, 0.2, 0.3, 0.4, np.nan], [0.95, 0.9, 0.7, 0.6, 0.2])
    assert rho == -1.0 and n == 4
