"""Every GPU figure the project reports, from one command: ``make gpu-check``, in stages.

On a lent GPU machine (the device tool), with the wheels of ``make gpu-wheels`` carried:

    run(command="make gpu-check", carry=[".gpu-wheels"], timeout_s=600)

Everything it writes goes under ``$OUT`` when that is set (the results as ``gpu_<card>.md`` and
``.json``, the log, the profiler's kernel table), else under ``benchmarks/results/``. The stages'
budgets sum to under 8 minutes, so one 10-minute call brings everything back; each stage writes
its figures as soon as it ends, so a command stopped at its limit keeps what it measured:

1. ``versions``: torch, CUDA, cuDNN, NCCL, driver, the card, native bf16, TF32 settings;
2. ``numerics``: bf16 against fp32 (TF32 off) on one 3x3x3 convolution and on the full network at
   the full grid (relative error and arg-max agreement, with thresholds), and every convolution
   kernel the profiler sees in forward and backward (a ``slow_conv3d``-like fallback fails it);
3. ``speed``: the library's training step (cuDNN autotuner on, as in training): s/step, TFLOP/s,
   MFU, peak memory; eager, channels-last, ``torch.compile``. Not run when ``numerics`` failed;
4. ``data``: a full-size synthetic set (256x256x128, a fifth 144 deep);
5. ``epochs``: the trainer itself at ``full`` for 3 epochs, validating every epoch: seconds per
   epoch split into steps, validation and checkpoints, a five-step profiler table of the top
   kernels, and the 600-epoch run projected from them;
6. ``chapters``: chapters 4 and 5 through papermill with the ``full`` preset for 3 epochs (the
   chapters' checks compare like with like; no Dice bar applies to so short a run);
7. ``resume``: a run with dropout killed after a checkpoint and resumed ends within the noise of
   two identical uninterrupted runs (on a GPU that noise is not zero: cuDNN's autotuner and atomic
   additions);
8. ``inference``: s/volume at 256x256x128: whole grid, mirrored, sliding windows;
9. ``torchrun``: one process under torchrun (NCCL);
10. ``models``: ResUNet3D against MONAI's networks, each trained by the library's ``fit``.

A stage that reaches its budget stops, records "cut at budget", and its child processes (their
own process group) are killed; GPU memory is released between stages. ``--dry-run`` runs every
stage on the CPU at tiny sizes (``make test`` does), so the command cannot rot between the rare GPU
sessions.

    python benchmarks/gpu_check.py [--dry-run] [--stages numerics,speed] [--out FILE] [--minutes 8]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_step, provenance

from provenance import markdown_line, provenance  # noqa: E402

from hipseg_lib.config import TrainConfig, make_config  # noqa: E402
from hipseg_lib.model import ResUNet3D, count_parameters  # noqa: E402
from hipseg_lib.plan import peak_tflops, plan_run, step_flops  # noqa: E402
from hipseg_lib.runtime import cuda_has_bf16  # noqa: E402

# The numerical stage's thresholds: bf16 against fp32 with TF32 off.
CONV_RELATIVE_ERROR = 1e-2
NETWORK_RELATIVE_ERROR = 5e-2
ARGMAX_AGREEMENT = 0.95
# Kernel names that mean a slow fallback for a 3D convolution on a GPU.
SLOW_KERNELS = ("slow_conv3d", "slow_conv_dilated3d", "slow_conv_transpose3d", "vol2col", "col2vol",
                "conv_depthwise3d")
# A resumed run may differ from an uninterrupted one by this many times the difference between two
# uninterrupted runs (the device's own noise), plus a floor for a device with no noise at all.
RESUME_NOISE_FACTOR = 3.0
RESUME_FLOOR = 1e-6


class CutAtBudget(Exception):
    """A stage reached its time budget: what it measured so far is kept."""


@dataclass
class Context:
    """What every stage gets: the run's settings, its folders and its clock."""

    dry: bool
    device: torch.device
    cfg: TrainConfig
    work: Path
    log: Callable[[str], None]
    steps: int
    out_dir: Path | None = None  # $OUT: the profiler table goes there too
    deadline: float = math.inf  # the current stage's, from time.perf_counter()
    data: Path | None = None

    def check_budget(self) -> None:
        if time.perf_counter() > self.deadline:
            raise CutAtBudget()

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}


def run_child(ctx: Context, cmd: list[str], what: str) -> str:
    """Run ``cmd`` in a process group of its own; at the stage's budget the whole group is killed
    (a child's children too) and the stage is cut. Returns its output; raises on a non-zero exit."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=max(1.0, ctx.left()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CutAtBudget() from None
    if proc.returncode:
        last = (text.strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{what} exited {proc.returncode}: {last}")
    return text


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stage_versions(ctx: Context, out: dict) -> None:
    out["torch"] = torch.__version__
    out["python"] = sys.version.split()[0]
    # what the chapters import beside torch: a missing wheel is named here, not mid-chapter
    for name in ("nibabel", "papermill", "ipykernel", "IPython", "monai", "skimage"):
        out[name] = importlib.import_module(name).__version__
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        out["card"] = props.name
        out["compute capability"] = f"{props.major}.{props.minor}"
        out["memory GB"] = round(props.total_memory / 2**30, 1)
        out["CUDA (torch built with)"] = torch.version.cuda
        out["cuDNN"] = torch.backends.cudnn.version()
        try:
            out["NCCL"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError) as exc:
            out["NCCL"] = f"n/a ({exc})"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["driver"] = smi.stdout.strip() or "n/a"
        except (OSError, subprocess.TimeoutExpired):
            out["driver"] = "n/a (no nvidia-smi)"
        out["native bf16"] = cuda_has_bf16()
    else:
        out["card"] = "CPU dry run"
    out["TF32 matmul / cuDNN"] = f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def stage_numerics(ctx: Context, out: dict) -> None:
    """bf16 against fp32 (TF32 off), then the kernels the profiler sees; raises when a threshold fails."""
    dev, cfg = ctx.device, ctx.cfg
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        ch, size = (8, 16) if ctx.dry else (64, 64)
        conv = torch.nn.Conv3d(ch, ch, 3, padding=1).to(dev)
        x = torch.randn(1, ch, size, size, size, device=dev)
        with torch.no_grad():
            ref = conv(x)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                low = conv(x)
        out["conv 3x3x3 bf16 relative error"] = _relative(low, ref)
        net = ResUNet3D(cfg.model).to(dev).eval()
        x = torch.randn(1, 1, *cfg.preprocessing.target_shape, device=dev)
        with torch.no_grad():
            ref = net(x)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                low = net(x)
        out["network bf16 relative error"] = _relative(low, ref)
        out["network bf16 arg-max agreement"] = float((low.argmax(1) == ref.argmax(1)).float().mean())
        ctx.check_budget()
        kernels = _conv_kernels(net, x, dev)
        out["convolution kernels"] = ", ".join(kernels[:25]) or "none seen"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    wrong = []
    if out["conv 3x3x3 bf16 relative error"] > CONV_RELATIVE_ERROR:
        wrong.append(f"conv3d bf16 relative error {out['conv 3x3x3 bf16 relative error']:.3g} > {CONV_RELATIVE_ERROR}")
    if out["network bf16 relative error"] > NETWORK_RELATIVE_ERROR:
        wrong.append(f"network bf16 relative error {out['network bf16 relative error']:.3g} > {NETWORK_RELATIVE_ERROR}")
    if out["network bf16 arg-max agreement"] < ARGMAX_AGREEMENT:
        wrong.append(f"arg-max agreement {out['network bf16 arg-max agreement']:.3f} < {ARGMAX_AGREEMENT}")
    slow = slow_kernels(kernels)  # every name, not only the 25 listed
    if slow and dev.type == "cuda":
        wrong.append(f"slow convolution kernels: {', '.join(slow)}")
    if wrong:
        raise RuntimeError("; ".join(wrong))


def slow_kernels(names: list[str]) -> list[str]:
    return [k for k in names if any(s in k for s in SLOW_KERNELS)]


def _conv_kernels(net: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> list[str]:
    """Every convolution kernel of one bf16 training step, forward and backward (the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    net = net.train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = net(x)
        y = y[0] if isinstance(y, list) else y  # training: the deep-supervision heads
        y.float().sum().backward()
        _sync(dev)
    names = {e.key for e in prof.key_averages()}
    wanted = ("conv", "cudnn", "xmma", "implicit_gemm", "wgrad", "dgrad", "fprop", "col2vol", "vol2col")
    return sorted(n for n in names if any(w in n.lower() for w in wanted) and len(n) < 300)


def stage_speed(ctx: Context, out: dict) -> None:
    """The library's training step of the full preset: eager, channels-last, compiled."""
    from bench_step import make_step, time_steps

    cfg, dev = ctx.cfg, ctx.device
    flops = step_flops(cfg)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = peak_tflops(name) if dev.type == "cuda" else None
    out["parameters"] = f"{count_parameters(ResUNet3D(cfg.model)) / 1e6:.2f} M"
    out["GFLOP per step"] = flops / 1e9
    precision = "bf16" if dev.type == "cuda" else "auto"
    variants = [("eager", False, False), ("channels-last", True, False)]
    variants += [("torch.compile", False, True)] if not ctx.dry else []
    for label, cl, comp in variants:
        ctx.check_budget()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        step, first = make_step(cfg, dev, precision, "channels-last" if cl else "default", comp,
                                ctx.steps)
        secs = time_steps(step, dev, ctx.steps)
        tflops = flops / secs / 1e12
        out[f"s/step {label}"] = secs
        out[f"TFLOP/s {label}"] = tflops
        out[f"MFU {label}"] = f"{100 * tflops / peak:.1f} %" if peak else "n/a (no bf16 peak known)"
        if dev.type == "cuda":
            out[f"peak memory {label} GB"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if comp:
            out["compile s (first step)"] = first
        _release(dev)
    if ctx.dry:
        out["s/step torch.compile"] = "n/a (dry run: compiling costs minutes on a CPU)"


def stage_data(ctx: Context, out: dict) -> None:
    from hipseg_lib.io import find_pairs
    from hipseg_lib.synth import make_dataset

    t = time.perf_counter()
    data = ctx.work / "data"
    if ctx.dry:
        make_dataset(data, seed=0, cases=6, shape=(32, 32, 16), weeks=(2, 3), workers=1)
    else:
        make_dataset(data, seed=0, cases=10, shape=(256, 256, 128), weeks=(2, 3))
    ctx.data = data
    pairs = find_pairs(data).pairs
    shapes = sorted({"x".join(map(str, _shape(p.image))) for p in pairs})
    out["synthesis s"] = time.perf_counter() - t
    out["data set"] = f"{len(pairs)} volumes, shapes {', '.join(shapes)}"


def _shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    shape = nib.load(str(path)).header.get_data_shape()  # type: ignore[attr-defined]
    return tuple(int(s) for s in shape[:3])


def _need_data(ctx: Context) -> Path:
    if ctx.data is None:
        raise RuntimeError("no data: the 'data' stage did not run or failed")
    return ctx.data


def stage_epochs(ctx: Context, out: dict) -> None:
    """The trainer's own epochs at ``full`` (validation every epoch), split into their parts, and
    a profiler table of five training steps."""
    from hipseg_lib.trainer import RunOptions, Trainer

    cfg = ctx.cfg.replace(epochs=3, val_every=1)
    device = "cpu" if ctx.dry else "cuda"
    options = RunOptions(cache_dir=ctx.work / "cache", device=device)
    trainer = Trainer(cfg, _need_data(ctx), ctx.work / "epochs", options, progress=False, log=ctx.log)
    result = trainer.fit()
    hist = result.history
    steady = hist[1:] or hist  # the first epoch carries the autotuner's and the cache's one-off costs
    steps = float(np.median([h["seconds"] for h in steady]))
    val = float(np.median([h.get("val_seconds", 0.0) for h in steady]))
    save = float(np.median([h.get("save_seconds", 0.0) for h in steady]))
    n = trainer.data.batches.steps_per_epoch
    out["steps per epoch"] = n
    out["epoch s: training steps"] = steps
    out["s/step (trainer)"] = steps / n
    out["epoch s: validation"] = val
    out["epoch s: checkpoints"] = save
    out["first epoch s"] = hist[0]["seconds"] + hist[0].get("val_seconds", 0) + hist[0].get("save_seconds", 0)
    full = make_config("full")
    per_epoch = steps + (val + save) / full.val_every
    out[f"projected {full.epochs} epochs (validation every {full.val_every}), this data"] = \
        f"{full.epochs * per_epoch / 60:.1f} min"
    plan = plan_run(full)
    out["planned (10 % MFU, real set)"] = f"{plan['minutes']:.1f} min"
    if "peak_gpu_memory_gb" in hist[-1]:
        out["peak memory GB (trainer)"] = hist[-1]["peak_gpu_memory_gb"]
    ctx.check_budget()
    out["table"] = _profile_steps(trainer, ctx)


def _profile_steps(trainer, ctx: Context) -> str:
    """Five of the trainer's steps under the profiler: the top kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    dev = trainer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    batches = iter(trainer.data.batches.epoch(99))
    trainer.network.train()
    with profile(activities=activities) as prof:
        for _ in range(5):
            image, label = next(batches)
            trainer.step(image, label)
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70)
    if ctx.out_dir is not None:
        (ctx.out_dir / "gpu_check_profile.txt").write_text(table)
    return "```\n" + table.strip() + "\n```"


def _chapter_params(ctx: Context) -> dict:
    params = {"preset": "full", "data_dir": str(_need_data(ctx)), "model_dir": str(ctx.work / "model"),
              "results_dir": str(ctx.work / "results"), "live_widgets": False, "epochs": 3,
              "check_results": False}  # 3 epochs: no Dice bar applies
    if ctx.dry:  # the smoke preset's sizes: a CPU runs the chapters' code in seconds
        params.update(preset="smoke", device="cpu", epochs=2)
    return params


def stage_chapters(ctx: Context, out: dict) -> None:
    """Chapters 4 and 5 through papermill (the book's own runner), the full preset, 3 epochs."""
    from hipseg_lib.book import execute_chapter

    params = _chapter_params(ctx)
    out["chapter 4 s"] = execute_chapter(ROOT / "book" / "04_training.ipynb",
                                         ctx.work / "executed" / "04_training.ipynb", params,
                                         timeout=max(60, int(ctx.left())))
    ctx.check_budget()
    out["chapter 5 s"] = execute_chapter(ROOT / "book" / "05_evaluation.ipynb",
                                         ctx.work / "executed" / "05_evaluation.ipynb", params,
                                         timeout=max(60, int(ctx.left())))
    doc = json.loads((ctx.work / "results" / "test_metrics.json").read_text())
    dice = doc["per_patient"]["dice"]
    out["test Dice per patient (3 epochs: not a result)"] = " ".join(
        "nan" if v["mean"] is None else f"{v['mean']:.3f}" for v in dice.values())
    out["inference chosen on validation"] = doc["inference"]


def _train_cmd(ctx: Context, out: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "hipseg_lib", "train", "--preset", "smoke", "--data", str(_need_data(ctx)),
           "--out", str(out), "--epochs", "3" if ctx.dry else "6", "--set", "dropout=0.3",
           "--save-every-epoch", "--quiet", "--cache-dir", str(ctx.work / "cache")]
    cmd += ["--device", "cpu", "--precision", "fp32"] if ctx.dry else ["--device", "cuda"]
    return cmd + (["--resume"] if resume else [])


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b if b[k].is_floating_point())


def stage_resume(ctx: Context, out: dict) -> None:
    """Killed after its first checkpoint and resumed, a run with dropout ends within the device's
    noise of a run never stopped: every random state it draws from came back."""
    from hipseg_lib.checkpoint import read_checkpoint

    killed = ctx.work / "resume-killed"
    proc = subprocess.Popen(_train_cmd(ctx, killed), env=_env(), cwd=str(ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not (killed / "last.pth").exists() and proc.poll() is None:
            ctx.check_budget()
            time.sleep(0.02)
    finally:
        _kill_group(proc)
    stopped = read_checkpoint(killed / "last.pth")
    out["random states saved"] = ", ".join(k for k, v in stopped["rng_states"][0].items() if v is not None)
    out["resumed after epoch"] = stopped["epoch"] + 1
    straight, again = ctx.work / "resume-straight", ctx.work / "resume-straight-again"
    run_child(ctx, _train_cmd(ctx, killed, resume=True), "hipseg train --resume")
    run_child(ctx, _train_cmd(ctx, straight), "hipseg train")
    run_child(ctx, _train_cmd(ctx, again), "hipseg train")
    a, b, c = (read_checkpoint(p / "last.pth")["model_state"] for p in (straight, again, killed))
    noise, gap = _max_difference(a, b), _max_difference(a, c)
    out["two uninterrupted runs: largest weight difference"] = noise
    out["resumed against uninterrupted: largest weight difference"] = gap
    allowed = RESUME_NOISE_FACTOR * noise + RESUME_FLOOR
    out["resumed within the noise"] = gap <= allowed
    if gap > allowed:
        raise RuntimeError(f"the resumed run's weights differ by {gap:.3g}, more than {allowed:.3g} "
                           f"({RESUME_NOISE_FACTOR:g} x the noise between two identical runs)")


def stage_inference(ctx: Context, out: dict) -> None:
    """Seconds per volume of ``Predictor.labels`` (preprocessing and resampling back included)."""
    from hipseg_lib.checkpoint import TorchBackend
    from hipseg_lib.io import find_pairs, load_volume
    from hipseg_lib.predictor import InferenceSettings, Predictor

    cfg, dev = ctx.cfg, ctx.device
    backend = TorchBackend(ResUNet3D(cfg.model).to(dev), dev)  # bf16 on a GPU with native bf16
    vol = load_volume(find_pairs(_need_data(ctx)).pairs[0].image)
    out["inference volume shape"] = "x".join(map(str, vol.array.shape))
    half = tuple(max(8, s // 2) for s in cfg.preprocessing.target_shape)
    variants = (("whole grid", InferenceSettings(mirror_axes=(), postprocess=False)),
                ("whole grid, mirrored", InferenceSettings(mirror_axes=(0,), postprocess=False)),
                (f"sliding windows of {'x'.join(map(str, half))}",
                 InferenceSettings(mirror_axes=(), postprocess=False, window=half)))
    for label, settings in variants:
        times = []
        for _ in range(3):
            ctx.check_budget()
            _sync(dev)
            t = time.perf_counter()
            Predictor(backend, cfg.preprocessing, settings).labels(vol.array, vol.affine)
            _sync(dev)
            times.append(time.perf_counter() - t)
        out[f"inference {label} s/vol"] = float(np.median(times[1:]))


def stage_torchrun(ctx: Context, out: dict) -> None:
    """One process under torchrun: the process group (NCCL on a GPU) and one epoch of training."""
    cfg = ctx.cfg
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "hipseg_lib", "train", "--preset", "full", "--data", str(_need_data(ctx)),
           "--out", str(ctx.work / "ddp"), "--epochs", "1", "--quiet", "--cache-dir", str(ctx.work / "cache")]
    if ctx.dry:
        cmd += ["--device", "cpu", "--target-shape", "x".join(map(str, cfg.preprocessing.target_shape)),
                "--base-channels", str(cfg.model.base_channels), "--depth", str(cfg.model.depth)]
    else:
        cmd += ["--device", "cuda"]
    text = run_child(ctx, cmd, "torchrun")
    m = re.search(r"training .* on (\S+) x (\d+) \((\w+)\)", text)
    if not m:
        raise RuntimeError("torchrun ran, but no process group was reported")
    log = [json.loads(line) for line in (ctx.work / "ddp" / "train_log.jsonl").read_text().splitlines()]
    out["torchrun"] = f"ok: {m.group(3)} on {m.group(1)}, world size {m.group(2)}, {log[-1]['steps']} steps"


def stage_models(ctx: Context, out: dict) -> None:
    try:
        import monai  # noqa: F401
    except ImportError:
        raise RuntimeError("MONAI is not importable (carry its wheel: benchmarks/gpu_wheels.sh)") from None
    out_dir = ctx.work / "models"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--data", str(_need_data(ctx)),
           "--out", str(out_dir), "--cache-dir", str(ctx.work / "cache")]
    # the dry run validates every other epoch, as the full preset does, so that its bookkeeping runs
    cmd += (["--preset", "smoke", "--epochs", "2", "--val-every", "2", "--device", "cpu"] if ctx.dry
            else ["--preset", "full", "--epochs", "2", "--device", "cuda"])
    run_child(ctx, cmd, "bench_models")
    out["table"] = sorted(out_dir.glob("models_*.md"))[0].read_text().strip()


def _release(device: torch.device) -> None:
    """Free what a stage left on the GPU before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# (name, function, budget in seconds on a GPU): the order they run in. Estimates from the stages'
# work (no GPU has run them yet); the first GPU run's "seconds" column replaces them.
STAGES = (("versions", stage_versions, 10), ("numerics", stage_numerics, 30), ("speed", stage_speed, 70),
          ("data", stage_data, 40), ("epochs", stage_epochs, 60), ("chapters", stage_chapters, 110),
          ("resume", stage_resume, 45), ("inference", stage_inference, 25), ("torchrun", stage_torchrun, 30),
          ("models", stage_models, 55))
STAGE_NAMES = tuple(name for name, _, _ in STAGES)


class Results:
    """The results file, rewritten (atomically) after every stage: what ended is never lost."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.stages: list[dict] = []

    def add(self, record: dict) -> None:
        self.stages.append(record)
        self.write()

    def write(self) -> None:
        prov = provenance()
        doc = {"provenance": prov, **self.header, "stages": self.stages,
               "failures": [s["line"] for s in self.stages if s["status"] == "failed"]}
        lines = [f"# GPU check: {self.header['device']}", "", markdown_line(prov), "",
                 "Written by `make gpu-check` (`benchmarks/gpu_check.py`), stage by stage as each ended; "
                 "every figure was measured in this run.", "",
                 "| stage | status | seconds | budget (s) |", "|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']:.0f} |" for s in self.stages]
        for s in self.stages:
            lines += ["", f"## {s['name']}: {s['status']}", ""]
            if s.get("line"):
                lines += [s["line"], ""]
            rows = [(k, v) for k, v in s["figures"].items() if k != "table"]
            if rows:
                lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
            if "table" in s["figures"]:
                lines += ["", s["figures"]["table"]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.path.with_suffix(".json"), json.dumps(doc, indent=2, default=str)),
                           (self.path, "\n".join(lines) + "\n")):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def run_stages(ctx: Context, wanted: list[str], results: Results, minutes: float, fail: set[str],
               kill_at: str | None, budget_scale: float) -> list[str]:
    """Each wanted stage in order, its figures written as it ends; returns the failure lines."""
    start = time.perf_counter()
    for name, fn, budget in STAGES:
        if name not in wanted:
            continue
        if name == kill_at:  # as when the command is stopped at its limit (tests)
            os._exit(3)
        record: dict[str, Any] = {"name": name, "budget_s": budget * budget_scale, "figures": {}, "seconds": 0.0}
        spent = time.perf_counter() - start
        if spent > 60 * minutes:
            record.update(status="not run", line=f"not run: the check's {minutes:g} minutes were spent")
        elif name == "speed" and any(s["name"] == "numerics" and s["status"] != "ok" for s in results.stages):
            record.update(status="skipped", line="skipped: the numerical stage did not pass, so no speed is reported")
        else:
            ctx.log(f"== {name} (budget {budget * budget_scale:.0f} s)")
            t = time.perf_counter()
            ctx.deadline = t + min(budget * budget_scale, 60 * minutes - spent)
            try:
                if name in fail:
                    raise RuntimeError(f"forced to fail (--fail-stage {name})")
                fn(ctx, record["figures"])
                record["status"] = "ok"
            except CutAtBudget:
                record.update(status="cut at budget", line=f"cut at budget: {budget * budget_scale:.0f} s")
            except Exception as exc:  # one line per failed stage; the rest still run
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                record.update(status="failed", line=f"gpu-check: stage '{name}' failed: {first}")
                traceback.print_exc(file=sys.stderr)
            finally:
                _release(ctx.device)
            record["seconds"] = time.perf_counter() - t
            ctx.log(f"   {name}: {record['status']} in {record['seconds']:.0f} s")
        results.add(record)
    return [s["line"] for s in results.stages if s["status"] == "failed"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes")
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"a subset of {','.join(STAGE_NAMES)}")
    p.add_argument("--out", help="results file (default $OUT/gpu_<card>.md, else benchmarks/results/gpu_<card>.md)")
    p.add_argument("--work", help="scratch folder for data, checkpoints and executed chapters (default: temporary)")
    p.add_argument("--minutes", type=float, default=None,
                   help="no stage starts after this many minutes (default 8; 60 for a dry run)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--fail-stage", action="append", default=[], help=argparse.SUPPRESS)  # tests: a stage that fails
    p.add_argument("--kill-at", choices=STAGE_NAMES, help=argparse.SUPPRESS)  # tests: stopped before this stage
    a = p.parse_args(argv)
    wanted = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STAGE_NAMES))
    if unknown:
        print(f"gpu-check: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_NAMES)}",
              file=sys.stderr)
        return 2
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or use --dry-run to test the path on the CPU", file=sys.stderr)
        return 1
    dry = a.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    cfg = make_config("full")
    if dry:
        cfg = cfg.replace(target_shape=(32, 32, 16), base_channels=4, depth=3, batch_size=2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    default = (out_dir or ROOT / "benchmarks" / "results") / f"gpu_{slug}.md"
    out_path = Path(a.out) if a.out else default
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HIPSEG_CACHE", str(work / "cache"))  # the chapters' cache
    t0 = time.perf_counter()

    def log(s: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)

    plan = plan_run(make_config("full"))
    header = {"device": name, "torch": torch.__version__, "dry_run": dry,
              "full preset": f"{'x'.join(map(str, cfg.preprocessing.target_shape))}, batch {cfg.batch_size}, "
                             f"base {cfg.model.base_channels}, depth {cfg.model.depth}",
              "planned full run (10 % MFU, real set)": f"{plan['epochs']} epochs, {plan['minutes']:.1f} min, "
                                                       f"{1000 * plan['step_s']:.1f} ms/step"}
    results = Results(out_path, header)
    results.write()  # the file exists from the start: a check stopped at once still says so
    ctx = Context(dry, device, cfg, work, log, 2 if dry else a.steps, out_dir=out_dir)
    minutes = a.minutes if a.minutes is not None else (60.0 if dry else 8.0)
    failures = run_stages(ctx, wanted, results, minutes, set(a.fail_stage), a.kill_at,
                          budget_scale=20.0 if dry else 1.0)
    log(f"wrote {out_path}")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
