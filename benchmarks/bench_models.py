"""Benchmark: hipseg's ResUNet3D against MONAI's UNet (num_res_units=2) and BasicUNet, each trained by
the library's own loop (:func:`hipseg_lib.train.fit`: the same step, schedule, loss, augmentation and
validation, the network passed in) on the same data for the same epochs.

MONAI's networks get the base width that brings their parameter count nearest ours. Each network
trains in a process of its own, so that its peak memory is its own. Prints and saves
(``benchmarks/results/models_<device>_<precision>.json`` and ``.md``) a table: parameters, seconds
per training step, validation Dice per class of the best epoch (validation patients: a design is
chosen on them, never on the test patients), peak memory.

    .venv/bin/python benchmarks/bench_models.py --epochs 4                   # CPU, about 10 minutes
    .venv/bin/python benchmarks/bench_models.py --preset full --epochs 3     # on a GPU

MONAI is needed only here: ``requirements.txt`` pins it for the test and benchmark environment.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from provenance import provenance, with_provenance

from hipseg_lib import CLASS_NAMES, NUM_CLASSES
from hipseg_lib.config import make_config
from hipseg_lib.locations import default_cache_dir, ensure_default_dataset
from hipseg_lib.model import ResUNet3D, count_parameters
from hipseg_lib.runtime import PRECISIONS, precision_name, resolve_device, resolve_precision
from hipseg_lib.train import best_record, fit, prepare_data

MODELS = ("hipseg-ResUNet3D", "monai-UNet", "monai-BasicUNet")


def _monai(name: str, width: int, depth: int) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet, UNet

    if name == "monai-UNet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                    channels=tuple(width * 2 ** i for i in range(depth)), strides=(2,) * (depth - 1),
                    num_res_units=2, norm="instance")
    # BasicUNet always has five levels (four poolings).
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES,
                     features=(width, width, 2 * width, 4 * width, 8 * width, width),
                     norm=("instance", {"affine": True}))


def build(name: str, cfg) -> torch.nn.Module:
    """The network; MONAI's at the width whose parameter count is nearest ours."""
    if name == "hipseg-ResUNet3D":
        return ResUNet3D(cfg.model)
    if name not in MODELS:
        raise ValueError(f"{name}: expected one of {', '.join(MODELS)}")
    target = count_parameters(ResUNet3D(cfg.model))
    width = min(range(4, 65, 2), key=lambda w: abs(count_parameters(_monai(name, w, cfg.model.depth)) - target))
    return _monai(name, width, cfg.model.depth)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def worker(name: str, args) -> dict:
    """One network trained by :func:`~hipseg_lib.train.fit`; its row of the table."""
    cfg = make_config(args.preset, epochs=args.epochs, seed=args.seed, val_every=args.val_every)
    device = resolve_device(args.device)
    data = prepare_data(cfg, args.data, args.cache_dir, device)
    torch.manual_seed(cfg.seed)
    network = build(name, cfg)
    with tempfile.TemporaryDirectory() as out:
        history = fit(cfg, data, out, device, args.precision, log=lambda s: None, network=network)
    steps = data.batches.steps_per_epoch
    seconds = [h["seconds"] for h in history[1:] or history]  # the first epoch carries one-off costs
    best = best_record(history)  # epochs without validation are skipped
    return {"model": name, "parameters": count_parameters(network), "epochs": len(history),
            "step_s": float(np.median(seconds)) / steps, "best_epoch": best["epoch"],
            "val_dice": best["val_dice"], "peak_memory_gb": peak_memory_gb(device),
            "precision": precision_name(resolve_precision(device, args.precision)), "seed": args.seed}


def table(rows: list[dict]) -> str:
    head = ("| network | parameters | epoch s / step (training and validation) | peak memory (GB) | "
            + " | ".join(f"{n} (val)" for n in CLASS_NAMES[1:]) + " |")
    lines = [head, "|" + "---|" * (4 + len(CLASS_NAMES) - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['step_s']:.3f} | "
                     f"{r['peak_memory_gb']:.2f} | " + " | ".join(f"{d:.3f}" for d in r["val_dice"][1:]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--data", default=None, help="default: $HIPSEG_DATA or the synthetic set")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=None, help="default: the preset's")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data = str(ensure_default_dataset(args.data))
    args.cache_dir = args.cache_dir or str(default_cache_dir())
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    try:
        import monai  # noqa: F401
    except ImportError:
        print("bench_models: MONAI is not installed; run `make setup` (requirements.txt pins it)", file=sys.stderr)
        return 1
    rows = []
    for name in args.models:  # each network in a process of its own: its own peak memory
        cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            print(f"bench_models: {name} failed: {last}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['step_s']:.3f} s a step, best mean foreground validation Dice "
              f"{np.mean(rows[-1]['val_dice'][1:]):.3f}", flush=True)
    prov = provenance()
    device = resolve_device(args.device).type
    stem = Path(args.out) / f"models_{device}_{rows[0]['precision']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"provenance": prov, "rows": rows}, indent=1) + "\n")
    text = (f"# hipseg against MONAI, each trained by hipseg_lib.train.fit\n\n{table(rows)}\n\n"
            f"Preset `{args.preset}`, {args.epochs} epochs, seed {args.seed}, {rows[0]['precision']}.\n")
    stem.with_suffix(".md").write_text(with_provenance(text, prov))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
