"""Which speed features help: the library's own training step, timed in one run.

Each variant is built by :func:`hipseg_lib.train.start_run` (the network, Adam, the loss, the
arithmetic and the memory layout that ``fit`` and ``hipseg train`` use) and stepped by
:func:`hipseg_lib.train.training_step` on the preset's grid. Variants: fp32 and the device's best
low precision, each in PyTorch's default memory layout and channels-last 3D (the library's choice
is marked), and ``torch.compile``. The variants are timed in turn over several rounds (the median
kept), and printed as seconds per step and the ratio to the first, so the comparison holds on a
shared machine; ``--out FILE.json`` also writes the rows with their
provenance (``benchmarks/results/``). cuDNN's autotuner is on, as in training.

    .venv/bin/python benchmarks/bench_step.py [--preset cpu] [--steps 4] [--rounds 5] [--no-compile]
        [--out F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import provenance, with_provenance

from hipseg_lib import NUM_CLASSES
from hipseg_lib.config import TrainConfig, make_config
from hipseg_lib.runtime import memory_layout, precision_name, resolve_device, resolve_precision
from hipseg_lib.train import start_run, training_step

LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(cfg: TrainConfig, device: torch.device, precision: str, layout: str,
              compile_: bool, steps: int) -> tuple[Callable[[], None], float]:
    """One variant's training step, ready to call, and its warm-up's seconds (compilation
    included)."""
    torch.backends.cudnn.benchmark = True  # as the trainer runs
    torch.manual_seed(0)
    run = start_run(cfg, steps + 1, device, precision)
    fmt = LAYOUTS[layout]
    run.network.to(memory_format=fmt)  # type: ignore[call-overload]
    shape = cfg.patch_shape or cfg.preprocessing.target_shape
    x = torch.randn(cfg.batch_size, 1, *shape, device=device).to(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size, *shape), device=device)
    net = torch.compile(run.network) if compile_ else run.network

    def step() -> None:
        training_step(net, run.loss_fn, run.optimizer, x, y, run.dtype, cfg.grad_clip, run.scaler)

    t = time.perf_counter()
    step()  # warm-up (and compilation)
    _sync(device)
    return step, time.perf_counter() - t


def time_steps(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """The mean seconds of ``steps`` calls of ``step``; on a GPU, CUDA events time them in the
    stream."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        _sync(device)
        return begin.elapsed_time(end) / 1000 / steps
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--preset", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the variants (the median is kept)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", help="also write the rows, with their provenance, to this JSON file (and .md)")
    p.add_argument("--note", help="a remark kept with the provenance (what else ran, say)")
    a = p.parse_args()
    cfg = make_config(a.preset)
    device = resolve_device(a.device)
    best = precision_name(resolve_precision(device, "auto"))
    variants = [(precision, layout, False) for precision in dict.fromkeys(["fp32", best])
                for layout in LAYOUTS]
    if not a.no_compile:
        variants.append((best, "default", True))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"{name}; preset {cfg.preset}: grid {cfg.preprocessing.target_shape}, batch {cfg.batch_size}, "
          f"base {cfg.model.base_channels}, depth {cfg.model.depth}")
    built = []
    for precision, layout, comp in variants:
        dtype = resolve_precision(device, precision)
        chosen = LAYOUTS[layout] == memory_layout(device, dtype) and not comp
        label = f"{precision}, {layout} layout" + (" + torch.compile" if comp else "") \
            + (" (the library's)" if chosen else "")
        try:
            step, first = make_step(cfg, device, precision, layout, comp, a.steps)
        except Exception as exc:  # e.g. no working compiler for torch.compile
            print(f"{label:<44} failed: {str(exc).splitlines()[0][:100]}")
            continue
        built.append((label, precision, layout, comp, chosen, step, first))
    # Rounds: every variant in turn, so that a change in the machine's load hits them alike.
    times: list[list[float]] = [[] for _ in built]
    for _ in range(a.rounds):
        for k, (*_, step, _first) in enumerate(built):
            times[k].append(time_steps(step, device, a.steps))
    rows: list[dict] = []
    base = statistics.median(times[0]) if times else 0.0
    for (label, precision, layout, comp, chosen, _, first), spent in zip(built, times):
        secs = statistics.median(spent)
        rows.append({"variant": label, "precision": precision, "layout": layout, "compile": comp,
                     "library_choice": chosen, "s_per_step": round(secs, 4),
                     "ratio_to_first": round(secs / base, 3)})
        print(f"{label:<44} {secs:7.3f} s/step  x{secs / base:4.2f} the first's time   "
              f"(first step {first:.1f} s)")
    if a.out:
        out, prov = Path(a.out), provenance()
        if a.note:
            prov["note"] = a.note
        doc = {"provenance": prov, "device": name, "preset": cfg.preset, "rows": rows}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        lines = ["| variant | s / step | x the first's time |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {r['s_per_step']:.3f} | {r['ratio_to_first']:.2f} |" for r in rows]
        text = (f"# The library's training step, {cfg.preset} preset: layouts and precisions\n\n"
                f"{name}. Each variant built by `start_run`, timed in turn (median of {a.rounds} "
                f"rounds of {a.steps} steps).\n\n" + "\n".join(lines) + "\n")
        out.with_suffix(".md").write_text(with_provenance(text, prov))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
