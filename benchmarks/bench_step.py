"""Which speed features help: one training step of the preset's network, timed in one run.

Variants: fp32, bf16 autocast, channels-last 3D, and torch.compile (each alone on top of the
preset's best precision). Prints seconds per step and the ratio to fp32, so the comparison holds
on a shared machine. Decides what the presets turn on.

    .venv/bin/python benchmarks/bench_step.py [--preset cpu] [--steps 8] [--no-compile]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from hipseg_lib import NUM_CLASSES
from hipseg_lib.loss import DiceCELoss
from hipseg_lib.model import ResUNet3D
from hipseg_lib.config import make_config
from hipseg_lib.runtime import autocast_for, resolve_device


def time_steps(cfg, device, amp: str, channels_last: bool, compile_: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = ResUNet3D(cfg.model).to(device)
    x = torch.randn(cfg.batch_size, 1, *cfg.preprocessing.target_shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size, *cfg.preprocessing.target_shape), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(NUM_CLASSES)

    def step():
        with autocast_for(device, amp)[0]:
            out = net(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t = time.perf_counter()
    step()  # warm-up (and compilation)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    cfg = make_config(a.preset)
    device = resolve_device(cfg.device)
    _, best = autocast_for(device, "auto")
    best_amp = "bf16" if best == torch.bfloat16 else ("fp16" if best == torch.float16 else "off")
    variants = [("fp32", "off", False, False), (f"{best_amp} autocast", best_amp, False, False),
                (f"{best_amp} + channels-last 3D", best_amp, True, False)]
    if not a.no_compile:
        variants.append((f"{best_amp} + torch.compile", best_amp, False, True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; preset {cfg.preset}: grid {cfg.preprocessing.target_shape}, batch {cfg.batch_size}, "
          f"base {cfg.model.base_channels}, depth {cfg.model.depth}")
    base = None
    for label, amp, cl, comp in variants:
        try:
            secs, first = time_steps(cfg, device, amp, cl, comp, a.steps)
        except Exception as exc:  # e.g. no working compiler for torch.compile
            print(f"{label:<32} failed: {str(exc).splitlines()[0][:100]}")
            continue
        base = base or secs
        print(f"{label:<32} {secs:7.3f} s/step  x{base / secs:4.2f} vs fp32   (first step {first:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
