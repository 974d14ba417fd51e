"""Which cpu recipe: train each candidate to its end and score the validation cases at their original grid
(a recipe is chosen on them, never on the test cases).

The candidates differ in one thing each from the `cpu` preset (whole volumes at 64x64x48):
each body crop resampled to one planned voxel spacing instead of resized to the grid ("spacing"),
patches with foreground oversampling, a finer grid with patches. Every run uses the same seed,
split and epochs; the printed table gives validation Dice and HD95 per foreground class (one
plain pass: no mirroring, no post-processing) and training time.

    .venv/bin/python benchmarks/bench_recipes.py [--amp off] [--recipes shape spacing patches fine-patches] \
        [--out benchmarks/results/preprocessing_validation]   # writes .json and .md with provenance

About 5-10 minutes per recipe on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hipseg_lib import CLASS_NAMES
from hipseg_lib.config import make_config
from hipseg_lib.data import split_by_case
from hipseg_lib.evaluate import evaluate_pairs
from hipseg_lib.io import find_pairs
from hipseg_lib.locations import ensure_default_dataset
from hipseg_lib.predict import load_predictor
from hipseg_lib.predictor import InferenceSettings
from hipseg_lib.train import train

RECIPES = {
    "cpu": {},
    "shape": dict(resample="shape"),
    "spacing": dict(resample="spacing"),
    "patches": dict(patch_shape=(48, 48, 32), foreground_fraction=0.33, batch_size=2),
    "fine-patches": dict(target_shape=(96, 96, 64), patch_shape=(64, 64, 48), foreground_fraction=0.33),
}


def run(name: str, data: Path, amp: str | None, out: Path, epochs: int = 16) -> dict:
    cfg = make_config("cpu", amp=amp, max_minutes=0, epochs=epochs, **RECIPES[name])
    t = time.perf_counter()
    result = train(cfg, data, out / name, progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t
    predictor = load_predictor(out / name / "new_model.pth", "cpu", InferenceSettings(tta=False, postprocess=False))
    val = split_by_case(find_pairs(data).pairs, seed=cfg.split_seed)["val"]
    rows = evaluate_pairs(predictor, val)
    dice = np.nanmean([r["metrics"]["dice"] for r in rows], axis=0)
    hd95 = np.nanmean([r["metrics"]["hd95"] for r in rows], axis=0)
    steps = sum(h["steps"] for h in result.history)
    return {"recipe": name, "steps": steps, "minutes": seconds / 60, "dice": dice, "hd95": hd95,
            "target_spacing": predictor.preprocessing.target_spacing}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--amp", default=None, choices=("auto", "bf16", "off"), help="default: the preset's (auto)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--epochs", type=int, default=16, help="16 is the cpu preset's; fewer for a quick look")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (with provenance) as well")
    a = p.parse_args()
    data = ensure_default_dataset(a.data)
    fg = CLASS_NAMES[1:]
    print("| recipe | steps | training (min) | grid spacing (mm) | " + " | ".join(f"{n} Dice" for n in fg)
          + " | mean Dice | " + " | ".join(f"{n} HD95" for n in fg) + " |")
    print("|---|---|---|---|" + "---|" * (2 * len(fg) + 1))
    lines, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.recipes:
            r = run(name, data, a.amp, Path(tmp), a.epochs)
            spacing = "x".join(f"{v:.2f}" for v in r["target_spacing"]) if r["target_spacing"] else "per scan"
            lines.append(f"| {name} | {r['steps']} | {r['minutes']:.1f} | {spacing} | "
                         + " | ".join(f"{d:.3f}" for d in r["dice"][1:]) + f" | {np.mean(r['dice'][1:]):.3f} | "
                         + " | ".join(f"{d:.1f}" for d in r["hd95"][1:]) + " |")
            print(lines[-1], flush=True)
            rows.append({"recipe": name, "steps": r["steps"], "minutes": r["minutes"],
                         "target_spacing": r["target_spacing"], "classes": list(fg),
                         "dice": [float(d) for d in r["dice"][1:]], "hd95": [float(d) for d in r["hd95"][1:]]})
    if a.out:
        from provenance import provenance, with_provenance

        prov = provenance()
        Path(a.out).with_suffix(".json").write_text(json.dumps({"provenance": prov, "rows": rows}, indent=1))
        head = ("| recipe | steps | training (min) | grid spacing (mm) | " + " | ".join(f"{n} Dice" for n in fg)
                + " | mean Dice | " + " | ".join(f"{n} HD95" for n in fg) + " |")
        text = (f"# Recipes on the validation cases ({a.epochs} epochs each)\n\n{head}\n|---|---|---|---|"
                + "---|" * (2 * len(fg) + 1) + "\n" + "\n".join(lines) + "\n")
        Path(a.out).with_suffix(".md").write_text(with_provenance(text, prov))
    return 0


if __name__ == "__main__":
    sys.exit(main())
