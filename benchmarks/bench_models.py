"""Benchmark: hipseg's ResUNet3D against MONAI's UNet (num_res_units=2) and BasicUNet.

Same data (the cached, preprocessed volumes of the `cpu` or `full` preset), same loader, loss
(hipseg DiceCELoss), optimiser (Adam, the preset's learning rate with warm-up and polynomial decay),
mixed precision setting, and the same wall-clock training budget for each network. Each network
runs in its own process so that its peak memory is its own.

Prints and saves (``benchmarks/results/models_<device>.json`` and ``.md``) a table: parameters,
train step time, inference time per volume, peak memory, and test Dice per class after the budget.

    .venv/bin/python benchmarks/bench_models.py --minutes 3            # CPU, about 10 minutes
    .venv/bin/python benchmarks/bench_models.py --preset full --minutes 5   # on a GPU

MONAI is needed only here: `requirements.txt` pins it for the test and benchmark environment.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hipseg_lib import CLASS_NAMES, NUM_CLASSES
from hipseg_lib.book import resolve_data_dir
from hipseg_lib.data import SegmentationDataset
from hipseg_lib.augment import default_augmentation
from hipseg_lib.loss import DiceCELoss
from hipseg_lib.metrics import dice_per_class
from hipseg_lib.model import ResUNet3D, count_parameters
from hipseg_lib.config import make_config, parse_settings
from hipseg_lib.data import load_split_volumes
from hipseg_lib.runtime import autocast_for, resolve_device, seed_everything

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
    """The network; MONAI's get the base width that brings their parameter count nearest ours."""
    if name == "hipseg-ResUNet3D":
        return ResUNet3D(cfg.model)
    if name not in MODELS:
        raise ValueError(name)
    target = count_parameters(ResUNet3D(cfg.model))
    width = min(range(4, 65, 2), key=lambda w: abs(count_parameters(_monai(name, w, cfg.model.depth)) - target))
    return _monai(name, width, cfg.model.depth)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def run_one(name: str, args) -> dict:
    cfg = make_config(args.preset, device=args.device, cache_dir=args.cache_dir, amp=args.amp)
    if args.target_shape:
        cfg = cfg.replace(target_shape=tuple(args.target_shape))
    if args.batch_size:
        cfg = cfg.replace(batch_size=args.batch_size)
    if args.base_channels or args.depth:
        cfg = cfg.replace(base_channels=args.base_channels or cfg.model.base_channels, depth=args.depth or cfg.model.depth)
    cfg = cfg.replace(**parse_settings(args.set))  # any other setting, e.g. deep_supervision=true
    device = resolve_device(cfg.device)
    seed_everything(0)
    vols = load_split_volumes(resolve_data_dir(args.data), cfg)
    train_ds = SegmentationDataset(vols["train"], default_augmentation(), seed=0)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    model = build(name, cfg).to(device)
    loss_fn = DiceCELoss(NUM_CLASSES)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ctx_amp = lambda: autocast_for(device, cfg.amp)[0]  # noqa: E731
    budget = args.minutes * 60
    warm = 20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, step_times, data_times = 0, [], []
    t_start = time.perf_counter()
    epoch = 0
    model.train()
    while time.perf_counter() - t_start < budget:
        train_ds.set_epoch(epoch)
        t0 = time.perf_counter()
        for image, label in loader:
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            t1 = time.perf_counter()
            frac = min(1.0, (time.perf_counter() - t_start) / budget)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (steps + 1) / warm) * (1 - frac) ** 0.9
            with ctx_amp():
                logits = model(image)
            loss = loss_fn(logits, label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            data_times.append(t1 - t0)
            step_times.append(t2 - t0)
            steps += 1
            t0 = time.perf_counter()
            if t0 - t_start >= budget:
                break
        epoch += 1
    model.eval()
    infer, dices = [], []
    with torch.no_grad():
        for v in vols["test"]:
            img, lab = v.load()
            x = torch.from_numpy(np.asarray(img))[None, None].to(device)
            t = time.perf_counter()
            with ctx_amp():
                pred = model(x).argmax(1)[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            infer.append(time.perf_counter() - t)
            dices.append(dice_per_class(pred.cpu().numpy(), np.asarray(lab)))
    steady = step_times[5:] or step_times
    return {"model": name, "parameters": count_parameters(model), "steps": steps,
            "train_step_s": float(np.median(steady)),
            "data_fraction": float(np.sum(data_times[5:]) / max(np.sum(steady), 1e-9)),
            "inference_s_per_volume": float(np.median(infer[1:] or infer)),
            "peak_memory_gb": peak_memory_gb(device), "memory_kind": "GPU allocated" if device.type == "cuda" else "process RSS",
            "test_dice": [float(x) for x in np.nanmean(dices, axis=0)],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads",
            "preset": cfg.preset, "target_shape": list(cfg.preprocessing.target_shape), "batch_size": cfg.batch_size,
            "amp": str(autocast_for(device, cfg.amp)[1]), "minutes": args.minutes}


def table(rows: list[dict]) -> str:
    head = ("| network | parameters | train step (s) | data wait | inference (s/vol) | peak memory (GB) | "
            + " | ".join(CLASS_NAMES) + " |")
    lines = [head, "|" + "---|" * (6 + len(CLASS_NAMES))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['train_step_s']:.3f} | "
                     f"{100 * r['data_fraction']:.1f}% | {r['inference_s_per_volume']:.3f} | "
                     f"{r['peak_memory_gb']:.2f} | " + " | ".join(f"{d:.3f}" for d in r["test_dice"]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--data", default=None, help="default: $HIPSEG_DATA or the synthetic set")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per network")
    p.add_argument("--device", default="auto")
    p.add_argument("--target-shape", type=int, nargs=3)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--base-channels", type=int, help="ResUNet3D width (default: the preset's)")
    p.add_argument("--depth", type=int, help="ResUNet3D levels (default: the preset's)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="default: the preset's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another setting of the preset, e.g. deep_supervision=true (repeatable)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_one(args.worker, args)), flush=True)
        return 0
    try:
        import monai  # noqa: F401
    except ImportError:
        print("bench_models: MONAI is not installed; run `make setup` (requirements.txt pins it)",
              file=sys.stderr)
        return 1
    resolve_data_dir(args.data)  # make the default data once, before the workers
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--worker", name] + [a for a in sys.argv[1:]]
        print(f"== {name} ({args.minutes:g} min budget)", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HIPSEG_PLAIN_PROGRESS": "1"})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[0][7:]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if rows[0]["device"] and not rows[0]["device"].startswith("CPU") else "cpu"
    (out / f"models_{tag}.json").write_text(json.dumps(rows, indent=2))
    md = (f"Device: {rows[0]['device']}; preset {rows[0]['preset']}, grid {rows[0]['target_shape']}, "
          f"batch {rows[0]['batch_size']}, amp {rows[0]['amp']}, {args.minutes:g} min of training each.\n\n" + table(rows))
    (out / f"models_{tag}.md").write_text(md + "\n")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
