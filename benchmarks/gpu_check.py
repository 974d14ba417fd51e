"""Every GPU figure the project reports, from one command: ``make gpu-check``.

On one CUDA GPU, within about 8 minutes and with nothing downloaded:

1. makes a full-size synthetic set (256x256x128, a fifth 144 deep);
2. runs chapter 4 through papermill with the ``full`` preset for a short fixed budget, then
   chapter 5 (the card's papermill-run full training, on the GPU);
3. measures s/step, peak GPU memory, FLOPs per step (``FlopCounterMode``), achieved TFLOP/s and
   MFU against the card's bf16 dense peak, eager / channels-last / ``torch.compile``;
   inference s/volume at 256x256x128, whole-volume (plain and TTA) and sliding-window; a one-process
   ``torchrun`` (NCCL); ResUNet3D against MONAI's UNet and BasicUNet (``bench_models.py``);
4. writes ``benchmarks/results/gpu_<device>.md`` (and ``.json``), and exits non-zero with one
   line per failed stage, or with one line when there is no GPU.

``--dry-run`` runs the same stages on the CPU at tiny sizes (``make test`` does), so the command
cannot rot between the rare GPU sessions; the CUDA-only figures are then marked "n/a (CPU)".

    python benchmarks/gpu_check.py [--dry-run] [--out FILE] [--train-minutes 1.5]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_step

from hipseg_lib import NUM_CLASSES  # noqa: E402
from hipseg_lib.loss import DiceCELoss  # noqa: E402
from hipseg_lib.model import ResUNet3D, count_parameters  # noqa: E402
from hipseg_lib.config import make_config  # noqa: E402
from hipseg_lib.runtime import autocast_for  # noqa: E402
from hipseg_lib.plan import peak_tflops, plan_run, step_flops  # noqa: E402
from provenance import markdown_line, provenance  # noqa: E402

# Every figure the results file must hold (a test checks the dry run's file for each).
FIGURES = ("device", "torch", "data set", "synthesis s", "chapter 4 s", "chapter 5 s", "full preset grid",
           "parameters", "train s/step (papermill run)", "data wait (papermill run)",
           "peak GPU memory (papermill run) GB", "test Dice (papermill run)", "training stopped",
           "GFLOP per step", "s/step eager", "TFLOP/s eager", "MFU eager", "peak memory eager GB",
           "s/step channels-last", "TFLOP/s channels-last", "MFU channels-last",
           "s/step torch.compile", "TFLOP/s torch.compile", "MFU torch.compile", "compile s",
           "inference whole-volume s/vol", "inference whole-volume TTA s/vol", "inference sliding-window s/vol",
           "torchrun", "planned full run (10 % MFU, real set)",
           "loader: device pipeline volumes/s", "augmentation share of the step",
           "loader table", "models table")


class Stages:
    """Runs named stages, keeps going after a failure, and remembers one line for each."""

    def __init__(self, log):
        self.failures: list[str] = []
        self.log = log

    def run(self, name: str, fn, *args, **kwargs):
        self.log(f"== {name}")
        t = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            self.log(f"   {name}: done in {time.perf_counter() - t:.0f} s")
            return out
        except Exception as exc:  # one line per failed stage; the rest still run
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.failures.append(f"gpu-check: stage '{name}' failed: {line}")
            self.log(self.failures[-1])
            traceback.print_exc(file=sys.stderr)
            return None


def make_data(out: Path, dry: bool) -> tuple[Path, float]:
    from hipseg_lib.synth import make_dataset

    t = time.perf_counter()
    if dry:
        make_dataset(out, seed=0, cases=6, shape=(32, 32, 16), weeks=(2, 3), workers=1)
    else:
        make_dataset(out, seed=0, cases=10, shape=(256, 256, 128), weeks=(2, 3))
    return out, time.perf_counter() - t


def _chapter_params(data: Path, work: Path, cfg, train_minutes: float, dry: bool) -> dict:
    params = {"preset": "full", "data_dir": str(data), "model_dir": str(work / "model"),
              "results_dir": str(work / "results"), "live_widgets": False,
              "epochs": 40, "max_minutes": train_minutes}
    if dry:
        # Tiny sizes cannot learn: the chapters run their code but skip their Dice assertions.
        params.update(target_shape=list(cfg.preprocessing.target_shape), batch_size=cfg.batch_size, epochs=2,
                      device="cpu", check_results=False, base_channels=cfg.model.base_channels, depth=cfg.model.depth)
    return params


def run_training_chapter(data: Path, work: Path, cfg, train_minutes: float, dry: bool) -> dict:
    """Chapter 4 through papermill with the full preset (the book's own runner)."""
    from hipseg_lib.book import execute_chapter
    from hipseg_lib.checkpoint import read_checkpoint

    params = _chapter_params(data, work, cfg, train_minutes, dry)
    out = {"chapter 4 s": execute_chapter(ROOT / "book" / "04_training.ipynb",
                                          work / "executed" / "04_training.ipynb", params, timeout=1200)}
    log = [json.loads(line) for line in (work / "model" / "train_log.jsonl").read_text().splitlines()]
    steady = log[1:] or log
    last = read_checkpoint(work / "model" / "last.pth")
    out["train s/step (papermill run)"] = float(np.median([h["step_seconds"] for h in steady]))
    out["data wait (papermill run)"] = f"{100 * float(np.median([h['data_fraction'] for h in steady])):.1f} %"
    mem = [h["peak_gpu_memory_gb"] for h in log if "peak_gpu_memory_gb" in h]
    out["peak GPU memory (papermill run) GB"] = max(mem) if mem else "n/a (CPU)"
    out["training stopped"] = f"{last.get('stopped_because', '?')} ({len(log)} epochs)"
    return out


def run_evaluation_chapter(data: Path, work: Path, cfg, train_minutes: float, dry: bool) -> dict:
    """Chapter 5 through papermill on chapter 4's checkpoint."""
    from hipseg_lib.book import execute_chapter

    params = _chapter_params(data, work, cfg, train_minutes, dry)
    out = {"chapter 5 s": execute_chapter(ROOT / "book" / "05_evaluation.ipynb",
                                          work / "executed" / "05_evaluation.ipynb", params, timeout=1200)}
    doc = json.loads((work / "results" / "test_metrics.json").read_text())
    out["test Dice (papermill run)"] = " ".join(f"{v:.3f}" for v in _mean_dice(doc))
    return out


def _mean_dice(doc: dict) -> list[float]:
    """Mean test Dice per class from chapter 5's ``test_metrics.json``."""
    dice = doc["summary"]["dice"]
    return [float("nan") if dice[n]["mean"] is None else dice[n]["mean"] for n in doc["classes"]]


def time_steps(cfg, device, channels_last: bool, compiled: bool, steps: int) -> dict:
    """``bench_step.time_steps`` (bf16 on the GPU) plus the peak GPU memory and parameter count."""
    from bench_step import time_steps as timed

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs, first = timed(cfg, device, "bf16" if device.type == "cuda" else "auto", channels_last, compiled, steps)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"s": secs, "first": first, "mem": mem, "params": count_parameters(ResUNet3D(cfg.model))}


def step_figures(cfg, device, steps: int, compile_: bool = True) -> dict:
    flops = step_flops(cfg)  # counted by PyTorch on the meta device (hipseg_lib.plan)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(name) if device.type == "cuda" else None
    out: dict = {"GFLOP per step": flops / 1e9}
    for label, cl, comp in (("eager", False, False), ("channels-last", True, False),
                            ("torch.compile", False, True)):
        if comp and not compile_:
            # Compiling costs over a minute on a CPU; the dry run leaves it to the GPU run (the
            # eager fallback of a failing compile is tested in tests/test_train.py).
            for k in ("s/step", "TFLOP/s", "MFU"):
                out[f"{k} {label}"] = "n/a (dry run: not compiled)"
            out["compile s"] = "n/a (dry run)"
            continue
        try:
            r = time_steps(cfg, device, cl, comp, steps)
        except Exception as exc:  # e.g. no working compiler: reported, not fatal
            out[f"s/step {label}"] = f"failed: {str(exc).splitlines()[0][:120]}"
            out[f"TFLOP/s {label}"] = out[f"MFU {label}"] = "n/a"
            if comp:
                out["compile s"] = "n/a"
            continue
        tflops = flops / r["s"] / 1e12
        out[f"s/step {label}"] = r["s"]
        out[f"TFLOP/s {label}"] = tflops
        out[f"MFU {label}"] = f"{100 * tflops / peak:.1f} %" if peak else "n/a (no bf16 peak known)"
        if label == "eager":
            out["peak memory eager GB"] = r["mem"] if r["mem"] is not None else "n/a (CPU)"
            out["parameters"] = f"{r['params'] / 1e6:.2f} M"
        if comp:
            out["compile s"] = r["first"]
    return out


def inference_figures(cfg, data: Path, device, dry: bool) -> dict:
    """Seconds per volume of ``predict_array`` (preprocessing and resizing included)."""
    from hipseg_lib.io import find_pairs, load_volume
    from hipseg_lib.predict import predict_array

    model = ResUNet3D(cfg.model).to(device).eval()
    pair = next(p for p in find_pairs(data).pairs)
    vol = load_volume(pair.image)
    out = {}
    for label, memory, tta in (("whole-volume", 1 << 60, False), ("whole-volume TTA", 1 << 60, True),
                               ("sliding-window", 0, False)):
        times = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            with autocast_for(device, "auto").context:
                predict_array(model, vol.array, vol.affine, cfg.preprocessing, device, memory_bytes=memory,
                              tta=tta)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        out[f"inference {label} s/vol"] = float(np.median(times[1:]))
    out["inference volume shape"] = "x".join(map(str, vol.array.shape))
    return out


def torchrun_figure(data: Path, work: Path, cfg, dry: bool) -> str:
    """One process under torchrun: the process group (NCCL on a GPU) and one epoch of training."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "hipseg_lib", "train", "--preset", "full", "--data", str(data), "--out", str(work / "ddp"),
           "--epochs", "1", "--quiet"]
    if dry:
        cmd += ["--device", "cpu", "--target-shape", "x".join(map(str, cfg.preprocessing.target_shape)),
                "--base-channels", str(cfg.model.base_channels), "--depth", str(cfg.model.depth)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    text = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"torchrun exited {r.returncode}: {text.strip().splitlines()[-1] if text.strip() else ''}")
    m = re.search(r"training .* on (\S+) x (\d+) \((\w+)\)", text)
    if not m:
        raise RuntimeError("torchrun ran, but no process group was reported")
    log = [json.loads(line) for line in (work / "ddp" / "train_log.jsonl").read_text().splitlines()]
    return f"ok: {m.group(3)} on {m.group(1)}, world size {m.group(2)}, {log[-1]['steps']} steps"


def loader_figure(cfg, data: Path, device, dry: bool) -> dict:
    """``bench_loader.py`` where the GPU is: the device pipeline on CUDA beside the CPU pipelines."""
    out_md = Path(tempfile.mkdtemp(prefix="gpu-check-loader-")) / "loader.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--data", str(data), "--out", str(out_md)]
    if dry:
        cmd += ["--grids", "cpu", "--pipelines", "device", "scipy", "--workers", "1", "--volumes", "4",
                "--seconds", "0.2"]
    else:
        cmd += ["--grids", "full", "cpu", "--workers", "4", "8", "16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"bench_loader exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    doc = json.loads(out_md.with_suffix(".json").read_text())
    grid = "cpu" if dry else "full"
    kind = "cpu" if device.type == "cpu" else "cuda"
    rate = next(row["volumes_per_s"] for row in doc["rows"]
                if row["grid"] == grid and row["pipeline"] == f"hipseg device ({kind})")
    return {"loader table": out_md.read_text().strip(), "loader: device pipeline volumes/s": f"{rate:.1f} ({grid} grid)",
            "_device_volumes_per_s": rate}


def models_figure(data: Path, cfg, dry: bool, minutes: float) -> str:
    try:
        import monai  # noqa: F401
    except ImportError:
        raise RuntimeError("MONAI is not importable (carry its wheel: benchmarks/gpu_wheels.sh)") from None
    out_dir = Path(tempfile.mkdtemp(prefix="gpu-check-models-"))
    # Also the full preset's network made as light as the cpu preset's (three light levels, no
    # full-resolution decoder convolution), to choose the full preset's design by measurement.
    light = f"hipseg-ResUNet3D+light_levels={min(3, cfg.model.depth - 1)}+top_kernel=0"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--preset", "full", "--data", str(data),
           "--minutes", str(minutes), "--out", str(out_dir),
           "--models", "hipseg-ResUNet3D", light, "monai-UNet", "monai-BasicUNet"]
    if dry:
        cmd += ["--device", "cpu", "--target-shape", *map(str, cfg.preprocessing.target_shape), "--batch-size", "1",
                "--base-channels", str(cfg.model.base_channels), "--depth", str(cfg.model.depth)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"bench_models exited {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    md = sorted(out_dir.glob("models_*.md"))
    return md[0].read_text().strip()


def write_results(figures: dict, failures: list[str], path: Path) -> None:
    prov = provenance()
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = [f"# GPU check: {figures.get('device', '?')}", "",
             "Written by `make gpu-check` (`benchmarks/gpu_check.py`); every figure was measured in this run.",
             "", markdown_line(prov), "", "| figure | value |", "|---|---|"]
    for k in FIGURES:
        if k in ("models table", "loader table"):
            continue
        lines.append(f"| {k} | {fmt(figures.get(k, 'missing: stage failed'))} |")
    lines += ["", "## Augmented volumes per second (bench_loader.py)", "",
              figures.get("loader table", "missing: stage failed"), ""]
    lines += ["", "## ResUNet3D against MONAI (bench_models.py, full preset)", "",
              figures.get("models table", "missing: stage failed"), ""]
    if failures:
        lines += ["## Failed stages", ""] + [f"- {f}" for f in failures] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps({"provenance": prov, **figures, "failures": failures}, indent=2, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    p.add_argument("--out", help="results file (default benchmarks/results/gpu_<device>.md)")
    p.add_argument("--work", help="scratch folder for data, checkpoints and executed chapters (default: a temp folder)")
    p.add_argument("--train-minutes", type=float, default=1.5, help="chapter 4's training budget")
    p.add_argument("--models-minutes", type=float, default=0.25, help="training budget per network in bench_models")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    a = p.parse_args(argv)
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or use --dry-run to test the path on the CPU", file=sys.stderr)
        return 1
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    cfg = make_config("full")
    if dry:
        cfg = cfg.replace(target_shape=(32, 32, 16), base_channels=4, depth=3, batch_size=2, device="cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU dry run"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    out_path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"gpu_{slug}.md"
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("HIPSEG_CACHE", str(work / "cache"))
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)  # noqa: E731
    stages = Stages(log)
    figures: dict = {"device": name, "torch": torch.__version__,
                     "full preset grid": f"{'x'.join(map(str, cfg.preprocessing.target_shape))}, batch {cfg.batch_size}, "
                                         f"base {cfg.model.base_channels}, depth {cfg.model.depth}"}
    made = stages.run("synthetic data", make_data, work / "data", dry)
    if made is None:
        write_results(figures, stages.failures, out_path)
        print("\n".join(stages.failures), file=sys.stderr)
        return 1
    data, figures["synthesis s"] = made
    from hipseg_lib.io import find_pairs

    shapes = sorted({"x".join(map(str, load_shape(p.image))) for p in find_pairs(data).pairs})
    figures["data set"] = f"{len(find_pairs(data).pairs)} volumes, shapes {', '.join(shapes)}"
    figures.update(stages.run("chapter 4 (papermill, full preset)", run_training_chapter, data, work, cfg,
                              a.train_minutes, dry) or {})
    figures.update(stages.run("chapter 5 (papermill)", run_evaluation_chapter, data, work, cfg,
                              a.train_minutes, dry) or {})
    figures.update(stages.run("training step: FLOPs, eager, channels-last, compile", step_figures, cfg, device,
                              2 if dry else a.steps, not dry) or {})
    figures.update(stages.run("inference at full size", inference_figures, cfg, data, device, dry) or {})
    figures["torchrun"] = stages.run("torchrun, one process", torchrun_figure, data, work, cfg, dry) or "failed"
    plan = plan_run(make_config("full"))
    figures["planned full run (10 % MFU, real set)"] = (f"{plan['epochs']} epochs, {plan['minutes']:.1f} min, "
                                                       f"{1000 * plan['step_s']:.1f} ms/step")
    loader = stages.run("loader benchmark", loader_figure, cfg, data, device, dry) or {}
    rate = loader.pop("_device_volumes_per_s", None)
    figures.update(loader)
    step = figures.get("s/step eager")
    if dry:
        figures["augmentation share of the step"] = "n/a (dry run: the loader's grid is not the step's)"
    elif rate and isinstance(step, float):
        share = cfg.batch_size / rate / step
        figures["augmentation share of the step"] = f"{100 * share:.1f} % ({1000 * cfg.batch_size / rate:.1f} ms a batch)"
    figures["models table"] = stages.run("ResUNet3D vs MONAI", models_figure, data, cfg, dry,
                                         0.05 if dry else a.models_minutes) or "failed"
    figures["total s"] = time.perf_counter() - t0
    write_results(figures, stages.failures, out_path)
    print(out_path.read_text())
    log(f"wrote {out_path}")
    if stages.failures:
        print("\n".join(stages.failures), file=sys.stderr)
        return 1
    return 0


def load_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(int(s) for s in nib.load(str(path)).shape[:3])


if __name__ == "__main__":
    sys.exit(main())
