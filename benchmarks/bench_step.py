"""Which speed features help: the library's training step (:func:`hipseg_lib.train.training_step`,
the loss of :func:`hipseg_lib.train.make_loss`) on the preset's network, timed in one run.

Variants: fp32, the device's best low precision, channels-last 3D, and ``torch.compile`` (each on
top of that precision). Prints seconds per step and the ratio to fp32, so the comparison holds on a
shared machine. cuDNN's autotuner is on, as in training.

    .venv/bin/python benchmarks/bench_step.py [--preset cpu] [--steps 8] [--no-compile]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from hipseg_lib import NUM_CLASSES
from hipseg_lib.config import TrainConfig, make_config
from hipseg_lib.model import ResUNet3D
from hipseg_lib.runtime import precision_name, resolve_device, resolve_precision
from hipseg_lib.train import make_loss, training_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cfg: TrainConfig, device: torch.device, precision: str, channels_last: bool,
               compile_: bool, steps: int) -> tuple[float, float]:
    """The mean seconds of ``steps`` training steps after one warm-up step, and the
    warm-up's seconds (compilation included). On a GPU, CUDA events time the steps in the stream."""
    torch.backends.cudnn.benchmark = True  # as the trainer runs
    torch.manual_seed(0)
    model = ResUNet3D(cfg.model).to(device)
    shape = cfg.patch_shape or cfg.preprocessing.target_shape
    x = torch.randn(cfg.batch_size, 1, *shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size, *shape), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn, dtype = make_loss(cfg), resolve_precision(device, precision)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step() -> None:
        training_step(net, loss_fn, opt, x, y, dtype, cfg.grad_clip, scaler)

    t = time.perf_counter()
    step()  # warm-up (and compilation)
    _sync(device)
    first = time.perf_counter() - t
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        _sync(device)
        return begin.elapsed_time(end) / 1000 / steps, first
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    cfg = make_config(a.preset)
    device = resolve_device(a.device)
    best = precision_name(resolve_precision(device, "auto"))
    variants = [("fp32", "fp32", False, False)]
    if best != "fp32":
        variants.append((best, best, False, False))
    variants.append((f"{best} + channels-last 3D", best, True, False))
    if not a.no_compile:
        variants.append((f"{best} + torch.compile", best, False, True))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"{name}; preset {cfg.preset}: grid {cfg.preprocessing.target_shape}, batch {cfg.batch_size}, "
          f"base {cfg.model.base_channels}, depth {cfg.model.depth}")
    base = None
    for label, precision, cl, comp in variants:
        try:
            secs, first = time_steps(cfg, device, precision, cl, comp, a.steps)
        except Exception as exc:  # e.g. no working compiler for torch.compile
            print(f"{label:<32} failed: {str(exc).splitlines()[0][:100]}")
            continue
        base = base or secs
        print(f"{label:<32} {secs:7.3f} s/step  x{base / secs:4.2f} vs fp32   (first step {first:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
