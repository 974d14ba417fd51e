"""The two experiments without a network (chapters 2 and 3)."""
from __future__ import annotations

import numpy as np

from hipseg_lib.baseline import intensity_baseline_dice, nearest_label_dice, split_leak_experiment
from hipseg_lib.data import cache_pairs, split_by_case
from hipseg_lib.io import find_pairs
from hipseg_lib.preprocess import Preprocessing


def _volumes(root, tmp_path):
    return cache_pairs(find_pairs(root).pairs, Preprocessing(target_shape=(16, 16, 8)), tmp_path / "cache")


def test_nearest_label_copies_the_most_similar_image():
    images = np.eye(4, 8, dtype=np.float32)  # four orthogonal "images"
    images[3] = images[1]  # volume 3 looks exactly like volume 1
    labels = [np.full((2, 2, 2), k, np.uint8) for k in range(4)]
    labels[3] = labels[1].copy()
    dice, copied = nearest_label_dice(images, labels, pool=[0, 1, 2], test=[3])
    assert copied == [1] and dice == 1.0


def test_the_split_leak_changes_only_the_pool_and_sibling_weeks_flatter(tiny_synth, tmp_path):
    vols = _volumes(tiny_synth, tmp_path)
    rows = split_leak_experiment(vols, split_seeds=range(5))
    assert [r["seed"] for r in rows] == [0, 1, 2, 3, 4]
    for seed, r in zip(range(5), rows):
        assert r["test volumes"] == len(split_by_case(vols, seed=seed)["test"]), "the same test volumes"
    # the leak: with a test patient's other weeks in the pool, the copy-nearest model copies its own
    # patient and scores higher than from the training patients alone
    assert max(r["copied its own patient"] for r in rows) > 0
    assert np.mean([r["other weeks in the pool"] for r in rows]) > np.mean([r["split by patient"] for r in rows])


def test_intensity_baseline_finds_background_but_not_organs(tiny_synth, tmp_path):
    vols = _volumes(tiny_synth, tmp_path)
    split = split_by_case(vols, seed=0)
    train, test = split["train"], split["test"]
    dice = intensity_baseline_dice(train, test)
    assert dice.shape == (6,)
    assert dice[0] > 0.8, "air is dark: background is easy"
    assert np.nanmax(dice[2:]) < 0.5, "organs and bones share intensities with other tissue"


def test_the_intensity_baseline_benchmark_runs_on_a_data_folder(tiny_synth, tmp_path):
    """benchmarks/intensity_baseline.py: both classifiers' test Dice, one number per class."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "intensity_baseline.py"
    proc = subprocess.run([sys.executable, str(script), "--data", str(tiny_synth), "--preset", "smoke",
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("intensity-only classifiers,") and len(lines) == 3, proc.stdout
    for line, name in zip(lines[1:], ("maximum a posteriori", "maximum likelihood (class-balanced)")):
        assert line.startswith(f"{name}: test Dice background ") and "mean foreground 0." in line, line
