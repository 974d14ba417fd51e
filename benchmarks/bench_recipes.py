"""Which cpu recipe: train each candidate to its end and score the validation cases at their original grid
(a recipe is chosen on them, never on the test cases).

The candidates differ in one thing each from the `cpu` preset (whole volumes at 64x64x48):
patches with foreground oversampling, a finer grid with patches. Every run uses the same seed,
split and 12 epochs; the printed table gives validation Dice per class and training time.

    .venv/bin/python benchmarks/bench_recipes.py [--amp off] [--recipes cpu patches fine-patches]

About 5-10 minutes per recipe on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hipseg_lib import CLASS_NAMES
from hipseg_lib.locations import resolve_data_dir
from hipseg_lib.checkpoint import load_model
from hipseg_lib.data import split_by_case
from hipseg_lib.io import find_pairs
from hipseg_lib.evaluate import evaluate_pairs
from hipseg_lib.config import make_config
from hipseg_lib.train import train

RECIPES = {
    "cpu": {},
    "patches": dict(patch_shape=(48, 48, 32), foreground_fraction=0.33, batch_size=2),
    "fine-patches": dict(target_shape=(96, 96, 64), patch_shape=(64, 64, 48), foreground_fraction=0.33),
}


def run(name: str, data: Path, amp: str | None, out: Path, epochs: int = 12) -> dict:
    cfg = make_config("cpu", amp=amp, max_minutes=0, epochs=epochs, **RECIPES[name])
    t = time.perf_counter()
    result = train(cfg, data, out / name, progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t
    loaded = load_model(out / name / "new_model.pth")
    val = split_by_case(find_pairs(data).pairs, seed=cfg.split_seed)["val"]
    rows = evaluate_pairs(loaded.network, loaded.preprocessing, val, torch.device("cpu"), window=loaded.window)
    dice = np.nanmean([r["metrics"]["dice"] for r in rows], axis=0)
    steps = sum(h["steps"] for h in result.history)
    return {"recipe": name, "steps": steps, "minutes": seconds / 60, "dice": dice}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--amp", default=None, choices=("auto", "bf16", "off"), help="default: the preset's (auto)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--epochs", type=int, default=12, help="12 is the cpu preset's; fewer for a quick look")
    a = p.parse_args()
    data = resolve_data_dir(a.data)
    print("| recipe | steps | training (min) | " + " | ".join(CLASS_NAMES) + " | min |")
    print("|---|---|---|" + "---|" * (len(CLASS_NAMES) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.recipes:
            r = run(name, data, a.amp, Path(tmp), a.epochs)
            print(f"| {name} | {r['steps']} | {r['minutes']:.1f} | " + " | ".join(f"{d:.3f}" for d in r["dice"])
                  + f" | {r['dice'].min():.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
