"""Benchmark: hipseg's ResUNet3D against MONAI's UNet (num_res_units=2) and BasicUNet.

Same data (the cached, preprocessed volumes of the `cpu` or `full` preset), same loader, loss
(hipseg DiceCELoss), optimiser (Adam, the preset's learning rate with warm-up and polynomial decay),
mixed precision setting, and the same wall-clock training budget for each network. Each network
runs in its own process so that its peak memory is its own; the processes train in turns of a few
seconds (``--slice``), so that the machine's speed, which drifts on a shared machine, is the same
for all of them.

Prints and saves (``benchmarks/results/models_<device>.json`` and ``.md``) a table: parameters,
train step time, inference time per volume, peak memory, and validation Dice per class after the budget
(the validation cases: a design is chosen on them, never on the test cases).

    .venv/bin/python benchmarks/bench_models.py --minutes 3            # CPU, about 10 minutes
    .venv/bin/python benchmarks/bench_models.py --preset full --minutes 5   # on a GPU
    # a variant of ours beside the preset's, in the same run (network settings after "+"):
    .venv/bin/python benchmarks/bench_models.py --amp off --models hipseg-ResUNet3D \
        hipseg-ResUNet3D+light_levels=2+top_kernel=1 monai-UNet
    # MONAI's network with hipseg's convolution kernels (hipseg_lib.cpu_kernels.CPUConv3d) beside it:
    .venv/bin/python benchmarks/bench_models.py --amp off --models hipseg-ResUNet3D monai-UNet \
        monai-UNet+conv=hipseg

MONAI is needed only here: `requirements.txt` pins it for the test and benchmark environment.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from provenance import markdown_line, provenance

from hipseg_lib import CLASS_NAMES, NUM_CLASSES
from hipseg_lib.augment import augmentation_named
from hipseg_lib.cli import shape_type
from hipseg_lib.config import make_config, parse_settings
from hipseg_lib.cpu_kernels import use_cpu_kernels
from hipseg_lib.data import TrainingBatches, TrainingSet, load_split_volumes
from hipseg_lib.locations import ensure_default_dataset
from hipseg_lib.loss import DiceCELoss
from hipseg_lib.metrics import dice_per_class
from hipseg_lib.model import ResUNet3D, count_parameters
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


def split_variant(name: str) -> tuple[str, dict]:
    """``"hipseg-ResUNet3D+light_levels=3+top_kernel=0"`` -> the network and its settings: a variant
    of ours in the same run (MONAI's width still follows the network of the preset and ``--set``).
    ``"monai-UNet+conv=hipseg"``: MONAI's network computing its convolutions with hipseg's
    the convolution kernels of :func:`~hipseg_lib.cpu_kernels.use_cpu_kernels` (the same layers and weights,
    other CPU kernels)."""
    base, *settings = name.split("+")
    if base in MODELS and base != "hipseg-ResUNet3D" and settings == ["conv=hipseg"]:
        return base, {"conv": "hipseg"}
    if base not in MODELS or (settings and base != "hipseg-ResUNet3D"):
        raise argparse.ArgumentTypeError(f"{name}: expected one of {', '.join(MODELS)}, "
                                         "hipseg-ResUNet3D+KEY=VALUE+... or monai-...+conv=hipseg")
    return base, parse_settings(settings)


def build(name: str, cfg) -> torch.nn.Module:
    """The network; MONAI's get the base width that brings their parameter count nearest ours."""
    if name == "hipseg-ResUNet3D":
        return use_cpu_kernels(ResUNet3D(cfg.model))  # as training runs it
    if name not in MODELS:
        raise ValueError(name)
    target = count_parameters(ResUNet3D(cfg.model))
    width = min(range(4, 65, 2), key=lambda w: abs(count_parameters(_monai(name, w, cfg.model.depth)) - target))
    return _monai(name, width, cfg.model.depth)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


def run_config(args):
    """The preset with the command line's settings: what every network of the run trains with."""
    cfg = make_config(args.preset, device=args.device, cache_dir=args.cache_dir, amp=args.amp)
    if args.target_shape:
        cfg = cfg.replace(target_shape=args.target_shape)
    if args.batch_size:
        cfg = cfg.replace(batch_size=args.batch_size)
    if args.base_channels or args.depth:
        cfg = cfg.replace(base_channels=args.base_channels or cfg.model.base_channels,
                          depth=args.depth or cfg.model.depth)
    return cfg.replace(**parse_settings(args.set))  # any other setting, e.g. deep_supervision=true


class Trainer:
    """One network's training run, advanced a slice of its budget at a time (see :func:`worker`)."""

    def __init__(self, name: str, args):
        base, variant = split_variant(name)
        hipseg_conv = variant.pop("conv", None) == "hipseg"
        cfg = run_config(args).replace(**variant)  # only ours has variants: MONAI's width follows the preset's
        seed_everything(args.seed)
        model = build(base, cfg)
        if hipseg_conv:
            model = use_cpu_kernels(model)
        self.name, self.cfg, self.budget, self.seed = name, cfg, args.minutes * 60, args.seed
        self.device = device = resolve_device(cfg.device)
        self.vols = load_split_volumes(ensure_default_dataset(args.data), cfg)
        # as training draws them: resident on the device, augmented there (hipseg_lib.data)
        self.loader = TrainingBatches(TrainingSet(self.vols["train"], device, cfg.data_on), cfg.batch_size,
                                      seed=args.seed, augmentation=augmentation_named(cfg.augmentation))
        self.model = model.to(device)
        self.loss_fn = DiceCELoss(NUM_CLASSES)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = lambda: autocast_for(device, cfg.amp).context
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.batches = self._batches()
        self.active = 0.0  # seconds of training so far: the budget counts only these
        self.turns = 0
        self.step_times, self.data_times = [], []

    def _batches(self):
        epoch = 0
        while True:
            yield from self.loader.epoch(epoch)
            epoch += 1

    def train_for(self, seconds: float) -> None:
        """Train until ``seconds`` more of the budget are spent (or the budget is)."""
        cfg, device, warm = self.cfg, self.device, 20
        until = min(self.budget, self.active + seconds)
        self.turns += 1
        self.model.train()
        while self.active < until:
            t0 = time.perf_counter()
            image, label = next(self.batches)
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            t1 = time.perf_counter()
            frac = min(1.0, self.active / self.budget)  # warm-up, then polynomial decay over the budget
            for g in self.opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (len(self.step_times) + 1) / warm) * (1 - frac) ** 0.9
            with self.amp():
                logits = self.model(image)
            loss = self.loss_fn(logits, label)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            self.data_times.append(t1 - t0)
            self.step_times.append(t2 - t0)
            self.active += t2 - t0

    def finish(self, minutes: float) -> dict:
        """Validation Dice and inference time after the budget; the row of the table."""
        cfg, device = self.cfg, self.device
        self.model.eval()
        infer, dices = [], []
        with torch.no_grad():
            for v in self.vols["val"]:  # choices are made on validation cases, not on test cases
                img, lab = v.load()
                x = torch.from_numpy(np.array(img, dtype=np.float32))[None, None].to(device)
                t = time.perf_counter()
                with self.amp():
                    pred = self.model(x).argmax(1)[0]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                infer.append(time.perf_counter() - t)
                dices.append(dice_per_class(pred.cpu().numpy(), np.asarray(lab)))
        steady = self.step_times[5:] or self.step_times
        return {"model": self.name, "parameters": count_parameters(self.model), "steps": len(self.step_times),
                "turns": self.turns, "trained_s": self.active, "last_step_s": self.step_times[-1],
                "train_step_s": float(np.median(steady)),
                "data_fraction": float(np.sum(self.data_times[5:]) / max(np.sum(steady), 1e-9)),
                "inference_s_per_volume": float(np.median(infer[1:] or infer)),
                "peak_memory_gb": peak_memory_gb(device),
                "memory_kind": "GPU allocated" if device.type == "cuda" else "process RSS",
                "val_dice": [float(x) for x in np.nanmean(dices, axis=0)],
                "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else f"CPU x{torch.get_num_threads()} threads"),
                "preset": cfg.preset, "target_shape": list(cfg.preprocessing.target_shape),
                "batch_size": cfg.batch_size, "amp": autocast_for(device, cfg.amp).name, "minutes": minutes,
                "seed": self.seed}


def worker(name: str, args) -> None:
    """One network in its own process (its peak memory is its own), driven over stdin:
    ``train SECONDS`` trains a slice and answers ``done``; ``finish`` answers ``RESULT {json}``."""
    trainer = Trainer(name, args)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("train "):
            trainer.train_for(float(line.split()[1]))
            print("done", flush=True)
        elif line.startswith("finish"):
            print("RESULT " + json.dumps(trainer.finish(args.minutes)), flush=True)
            return


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, name: str):
        self.name = name
        cmd = [sys.executable, __file__, "--worker", name] + sys.argv[1:]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str | None, answer: str) -> str:
        """Send ``command`` (None: just wait) and return the first line that starts with ``answer``."""
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(answer):
                return line
        self.proc.wait()
        raise RuntimeError(f"bench_models: the {self.name} worker ended (exit {self.proc.returncode}); "
                           "its error is above")


def table(rows: list[dict]) -> str:
    head = ("| network | parameters | train step (s) | data wait | inference (s/vol) | peak memory (GB) | "
            + " | ".join(f"{n} (val)" for n in CLASS_NAMES) + " |")
    lines = [head, "|" + "---|" * (6 + len(CLASS_NAMES))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f} M | {r['train_step_s']:.3f} | "
                     f"{100 * r['data_fraction']:.1f}% | {r['inference_s_per_volume']:.3f} | "
                     f"{r['peak_memory_gb']:.2f} | " + " | ".join(f"{d:.3f}" for d in r["val_dice"]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--data", default=None, help="default: $HIPSEG_DATA or the synthetic set")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per network")
    p.add_argument("--device", default="auto")
    p.add_argument("--target-shape", type=shape_type, metavar="XxYxZ")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--base-channels", type=int, help="ResUNet3D width (default: the preset's)")
    p.add_argument("--depth", type=int, help="ResUNet3D levels (default: the preset's)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), help="default: the preset's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="another setting of the preset, e.g. deep_supervision=true (repeatable)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights, sample order and augmentation (the split stays the preset's)")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help=f"of {', '.join(MODELS)}; a variant of ours: hipseg-ResUNet3D+KEY=VALUE+...")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--slice", type=float, default=10.0,
                   help="seconds each network trains before the next takes its turn")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in args.models:
        try:
            split_variant(name)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    if args.worker:
        worker(args.worker, args)
        return 0
    try:
        import monai  # noqa: F401
    except ImportError:
        print("bench_models: MONAI is not installed; run `make setup` (requirements.txt pins it)",
              file=sys.stderr)
        return 1
    # The default data and the preprocessing cache, made once, before the workers that read them.
    load_split_volumes(ensure_default_dataset(args.data), run_config(args))
    # The networks train in turns of --slice seconds, so that a shared machine's speed, which
    # drifts over minutes, weighs on each alike: each gets the same seconds of training, however
    # fast the machine was in between.
    workers = [Worker(name) for name in args.models]
    try:
        for w in workers:
            w.ask(None, "ready")
        for turn in range(int(np.ceil(args.minutes * 60 / args.slice))):
            for w in workers:
                w.ask(f"train {args.slice}", "done")
            print(f"  {min((turn + 1) * args.slice, args.minutes * 60) / 60:.1f} of {args.minutes:g} min "
                  "trained by each network", flush=True)
        rows = []
        for w in workers:
            rows.append(json.loads(w.ask("finish", "RESULT ")[7:]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if rows[0]["device"] and not rows[0]["device"].startswith("CPU") else "cpu"
    prov = provenance()
    (out / f"models_{tag}.json").write_text(json.dumps({"provenance": prov, "rows": rows}, indent=2))
    md = (markdown_line(prov) + "\n\n"
          + f"Device: {rows[0]['device']}; preset {rows[0]['preset']}, grid {rows[0]['target_shape']}, "
          f"batch {rows[0]['batch_size']}, amp {rows[0]['amp']}, {args.minutes:g} min of training each, "
          f"in turns of {args.slice:g} s, seed {args.seed}.\n\n" + table(rows))
    (out / f"models_{tag}.md").write_text(md + "\n")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
