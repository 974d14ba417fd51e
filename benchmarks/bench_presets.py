"""How the `cpu` preset was chosen: variants of it trained by the library's own loop
(:func:`hipseg_lib.train.fit`), each scored on the **validation** patients (never the test
patients), with the seconds each epoch took on this machine.

Prints and saves ``benchmarks/results/cpu_preset.json`` and ``.md``:

    .venv/bin/python benchmarks/bench_presets.py                      # every variant, ~25 min (bf16)
    .venv/bin/python benchmarks/bench_presets.py --variants preset "12 epochs"
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from provenance import provenance, with_provenance

from hipseg_lib import CLASS_NAMES
from hipseg_lib.config import make_config
from hipseg_lib.locations import default_cache_dir, ensure_default_dataset
from hipseg_lib.runtime import precision_name, resolve_precision
from hipseg_lib.train import best_record, fit, prepare_data

VARIANTS: dict[str, dict] = {
    "preset": {},
    "12 epochs": {"epochs": 12},
    "14 epochs": {"epochs": 14},
    "lr 2e-3": {"lr": 2e-3},
    "seed 1": {"seed": 1},
    "nnU-Net's augmentation": {"augmentation": "nnunet"},
}


def run(name: str, data_dir, cache_dir, precision: str) -> dict:
    cfg = make_config("cpu", **VARIANTS[name])
    device = torch.device("cpu")
    data = prepare_data(cfg, data_dir, cache_dir, device)
    with tempfile.TemporaryDirectory() as out:
        history = fit(cfg, data, out, device, precision, log=lambda s: print(f"  {name}: {s}", flush=True))
    best = best_record(history)  # epochs without validation are skipped
    return {"variant": name, "changes": VARIANTS[name], "epochs": cfg.epochs,
            "best_epoch": best["epoch"], "val_dice": best["val_dice"],
            "mean_fg": float(np.nanmean(best["val_dice"][1:])), "min_fg": float(np.nanmin(best["val_dice"][1:])),
            "epoch_s": float(np.median([h["seconds"] for h in history[1:]])),
            "precision": precision_name(resolve_precision(device, precision)),
            "history": [{"epoch": h["epoch"], "val_dice": h.get("val_dice")} for h in history]}


def table(rows: list[dict]) -> str:
    head = ("| variant | epochs | best epoch | " + " | ".join(CLASS_NAMES[1:])
            + " | mean | lowest | s / epoch |")
    lines = [head, "|" + "---|" * (6 + len(CLASS_NAMES) - 1)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['epochs']} | {r['best_epoch']} | "
                     + " | ".join(f"{d:.3f}" for d in r["val_dice"][1:])
                     + f" | {r['mean_fg']:.3f} | {r['min_fg']:.3f} | {r['epoch_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    data = ensure_default_dataset(a.data)
    rows = [run(name, data, default_cache_dir(), a.precision) for name in a.variants]
    prov = provenance()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_preset.json").write_text(json.dumps({"provenance": prov, "rows": rows}, indent=1) + "\n")
    text = ("# The cpu preset and its variants, on the validation patients\n\n"
            "Best epoch's validation Dice (on the network's grid, one plain pass), each variant trained by "
            "`hipseg_lib.train.fit` with the preset's other settings; seconds per epoch on this machine, in "
            f"{rows[0]['precision']}.\n\n{table(rows)}\n")
    (out / "cpu_preset.md").write_text(with_provenance(text, prov))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
