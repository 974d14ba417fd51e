"""How far intensity alone gets: a per-voxel histogram classifier on the default data set.

Fits :func:`hipseg_lib.baseline.fit_intensity_classifier` (via ``intensity_baseline_dice``) on the
training cases (preprocessed as the `cpu` preset does) and prints per-class Dice on the test cases.
A mean foreground Dice well below the network's shows that the data need spatial context.

    .venv/bin/python benchmarks/intensity_baseline.py [--data DIR] [--preset cpu]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from hipseg_lib import CLASS_NAMES
from hipseg_lib.baseline import intensity_baseline_dice
from hipseg_lib.config import make_config
from hipseg_lib.data import load_split_volumes
from hipseg_lib.locations import default_cache_dir, ensure_default_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--cache-dir", default=None, help="default: $HIPSEG_CACHE or the user's cache")
    a = p.parse_args(argv)
    cfg = make_config(a.preset)
    vols = load_split_volumes(ensure_default_dataset(a.data), cfg, a.cache_dir or default_cache_dir())
    print(f"intensity-only classifiers, {len(vols['train'])} training / {len(vols['test'])} test volumes, "
          f"grid {cfg.preprocessing.target_shape}")
    for balanced in (False, True):
        dice = intensity_baseline_dice(vols["train"], vols["test"], balanced)
        name = "maximum likelihood (class-balanced)" if balanced else "maximum a posteriori"
        print(f"{name}: test Dice " + ", ".join(f"{n} {d:.3f}" for n, d in zip(CLASS_NAMES, dice))
              + f"; mean foreground {np.nanmean(dice[1:]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
