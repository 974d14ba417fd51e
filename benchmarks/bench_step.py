"""Which speed features help: one training step of the preset's network, timed in one run.

Variants: fp32, bf16 autocast, channels-last 3D, and torch.compile (each alone on top of the
preset's best precision). Prints seconds per step and the ratio to fp32, so the comparison holds
on a shared machine. Decides what the presets turn on.

On a CPU it then times the two kernel choices of ``hipseg_lib.cpu_kernels.CPUConv3d`` against the kernel
PyTorch picks by itself (``nn.Conv3d``), forward and backward, at the shapes the ``cpu`` preset
meets, and names the aten kernel each ran (PyTorch's profiler). ``CPUConv3d`` leans on a threshold
inside PyTorch (``_NATIVE_BELOW``) and on ``to_mkldnn``: after a torch upgrade these lines show
whether PyTorch still sends that convolution to ``slow_conv3d`` and whether hipseg's choice is
still the faster one (ratio above 1).

    .venv/bin/python benchmarks/bench_step.py [--preset cpu] [--steps 8] [--no-compile] [--kernels-only]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from hipseg_lib import NUM_CLASSES
from hipseg_lib.config import make_config
from hipseg_lib.cpu_kernels import CPUConv3d, use_cpu_kernels
from hipseg_lib.loss import DiceCELoss
from hipseg_lib.model import ResUNet3D
from hipseg_lib.runtime import autocast_for, resolve_device


def time_steps(cfg, device, amp: str, channels_last: bool, compile_: bool, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = ResUNet3D(cfg.model).to(device)
    if device.type == "cpu":
        use_cpu_kernels(model)  # as training runs it
    x = torch.randn(cfg.batch_size, 1, *cfg.preprocessing.target_shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size, *cfg.preprocessing.target_shape), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(NUM_CLASSES)

    def step():
        with autocast_for(device, amp).context:
            out = net(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t = time.perf_counter()
    step()  # warm-up (and compilation)
    sync()
    first = time.perf_counter() - t
    if device.type == "cuda":  # CUDA events in the stream: no synchronisation between the steps
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        sync()
        return begin.elapsed_time(end) / 1000 / steps, first
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps, first


# (what, in channels, out channels, kernel, volume): the cpu preset's head at full resolution and a
# 3x3x3 convolution of its deepest level, both for one volume (the preset's batch)
KERNEL_CASES = [("1x1x1 head, 24->6 ch at 64x64x48", 24, 6, 1, (64, 64, 48)),
                ("3x3x3, 48->48 ch at 16x16x12", 48, 48, 3, (16, 16, 12))]


def _convolution_kernels(fn, x) -> list[str]:
    """The aten kernels that compute ``fn(x)`` and its backward (by PyTorch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x).sum().backward()
    wanted = ("slow_conv3d_forward", "mkldnn_convolution", "aten::mm", "aten::bmm", "aten::matmul")
    return sorted({e.key for e in prof.key_averages() if any(w in e.key for w in wanted)})


def _time_fn(fn, x, steps: int) -> float:
    fn(x).sum().backward()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn(x).sum().backward()
    return (time.perf_counter() - t) / steps


def conv_kernel_rows(steps: int = 20) -> list[dict]:
    """For each case: the kernels PyTorch's ``nn.Conv3d`` and hipseg's ``CPUConv3d`` ran (fp32,
    forward and backward) and their seconds; ``speedup`` = PyTorch's time / hipseg's."""
    rows = []
    for what, cin, cout, k, shape in KERNEL_CASES:
        torch.manual_seed(0)
        conv = CPUConv3d(cin, cout, k, padding=k // 2)
        x = torch.randn(1, cin, *shape, requires_grad=True)
        plain = lambda v, c=conv: torch.nn.Conv3d.forward(c, v)  # noqa: E731
        row = {"case": what, "torch_kernels": _convolution_kernels(plain, x),
               "hipseg_kernels": _convolution_kernels(conv, x)}
        t_torch, t_ours = [], []
        for _ in range(5):  # interleaved, so that a shared machine's drift weighs on both alike
            t_torch.append(_time_fn(plain, x, steps))
            t_ours.append(_time_fn(conv, x, steps))
        row["torch_s"], row["hipseg_s"] = min(t_torch), min(t_ours)
        row["speedup"] = row["torch_s"] / row["hipseg_s"]
        rows.append(row)
    return rows


def print_conv_kernels(steps: int) -> None:
    print(f"\nhipseg_lib.cpu_kernels.CPUConv3d against PyTorch's own choice (fp32, forward + backward, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}):")
    for r in conv_kernel_rows(steps):
        print(f"  {r['case']:<34} PyTorch {1000 * r['torch_s']:6.1f} ms ({', '.join(r['torch_kernels'])})")
        print(f"  {'':<34} hipseg  {1000 * r['hipseg_s']:6.1f} ms ({', '.join(r['hipseg_kernels'])})"
              f"  x{r['speedup']:.2f}" + ("" if r["speedup"] > 1 else "  <- hipseg's choice is now slower"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="auto")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--kernels-only", action="store_true", help="only the CPUConv3d kernel lines (CPU)")
    a = p.parse_args()
    if a.kernels_only:
        print_conv_kernels(a.steps * 2)
        return 0
    cfg = make_config(a.preset)
    device = resolve_device(cfg.device)
    best = autocast_for(device, "auto").name
    best_amp = "off" if best == "fp32" else best
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
    if device.type == "cpu":
        print_conv_kernels(a.steps * 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
