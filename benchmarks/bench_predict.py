"""Peak memory and time of `Predictor.labels` on a large scan, per inference option (CPU path), and
of the same network exported to ONNX and run by ONNX Runtime without torch (`hipseg predict --model`).

Each configuration runs in its own process, so that its peak resident memory (ru_maxrss) is its
own. The scan is a synthetic 256x256x144 volume at 1.4x1.4x2.5 mm (a large HipMRI grid); the
networks are the `cpu` and `full` presets' (random weights: memory and time do not depend on them).

    python benchmarks/bench_predict.py [--shape 256x256x144] [--options OPTION ...] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import cpu_model, markdown_line, provenance  # noqa: E402

from hipseg_lib.cli import shape_type  # noqa: E402

# name: (Predictor settings, whether to predict in windows of half the grid)
OPTIONS: dict[str, tuple[dict[str, Any], bool]] = {"plain": (dict(mirror_axes=(), postprocess=False), False),
           "TTA": (dict(mirror_axes=(0,), postprocess=False), False),
           "TTA + post-processing": (dict(mirror_axes=(0,), postprocess=True), False),
           "TTA, windows": (dict(mirror_axes=(0,), postprocess=False), True),
           # the same network exported by `hipseg export`, run by ONNX Runtime in a process without torch
           "ONNX Runtime: TTA + post-processing": (dict(mirror_axes=(0,), postprocess=True), False)}


def one_onnx(model_path: str, option: str, shape: tuple[int, int, int]) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # as on a PC without PyTorch: importing it fails
    import numpy as np

    from hipseg_lib.predict import onnx_predictor
    from hipseg_lib.synth import SynthSpec, make_case_anatomy, render_volume

    options, _ = OPTIONS[option]
    predictor = onnx_predictor(model_path, **options)
    spec = SynthSpec(shape=shape, spacing=(1.4, 1.4, 2.5))
    rng = np.random.default_rng(0)
    image, _ = render_volume(make_case_anatomy(rng), spec, rng)
    for _ in range(2):  # the second call is timed
        start = time.perf_counter()
        label = predictor.labels(image, spec.affine)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert label.shape == shape and "torch" not in {m for m in sys.modules if sys.modules[m]}
    return {"grid": list(predictor.preprocessing.target_shape), "option": option, "seconds": round(seconds, 2),
            "peak_rss_gb": round(peak, 2)}


def export_random(preset_name: str, folder: Path) -> Path:
    """The preset's network with random weights (seed 0), exported to ONNX by hipseg export."""
    import torch

    from hipseg_lib.checkpoint import save_checkpoint
    from hipseg_lib.config import make_config
    from hipseg_lib.export import export_model
    from hipseg_lib.model import ResUNet3D
    from hipseg_lib.train import inference_settings

    cfg = make_config(preset_name)
    torch.manual_seed(0)
    ckpt = folder / f"{preset_name}.pth"
    save_checkpoint(ckpt, ResUNet3D(cfg.model).eval(), cfg.preprocessing, inference_settings(cfg))
    return export_model(ckpt, "onnx", folder)[0]


def one(preset_name: str, option: str, shape: tuple[int, int, int]) -> dict:
    import numpy as np
    import torch

    from hipseg_lib.checkpoint import TorchBackend
    from hipseg_lib.config import make_config
    from hipseg_lib.model import ResUNet3D
    from hipseg_lib.predictor import InferenceSettings, Predictor
    from hipseg_lib.synth import SynthSpec, make_case_anatomy, render_volume

    torch.set_num_threads(2)
    cfg = make_config(preset_name)
    model = ResUNet3D(cfg.model).eval()
    spec = SynthSpec(shape=shape, spacing=(1.4, 1.4, 2.5))
    rng = np.random.default_rng(0)
    image, _ = render_volume(make_case_anatomy(rng), spec, rng)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    options, windows = OPTIONS[option]
    window = tuple(s // 2 for s in cfg.preprocessing.target_shape) if windows else None
    for _ in range(2):  # the second call is timed: the first also sets up oneDNN's kernels
        start = time.perf_counter()
        predictor = Predictor(TorchBackend(model, "cpu"), cfg.preprocessing,
                              InferenceSettings(window=window, **options))
        label = predictor.labels(image, spec.affine)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert label.shape == shape
    return {"preset": preset_name, "grid": list(cfg.preprocessing.target_shape), "option": option,
            "seconds": round(seconds, 2), "peak_rss_gb": round(peak, 2), "rss_before_gb": round(before, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=shape_type, default=(256, 256, 144), metavar="XxYxZ")
    ap.add_argument("--presets", nargs="+", default=["cpu", "full"])
    ap.add_argument("--out", default=None, help="also write a markdown table here")
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS), metavar="OPTION",
                    help=f"of: {'; '.join(OPTIONS)}")
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "OPTION"), help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = tuple(a.shape)
    if a.one:
        row = one_onnx(a.onnx, a.one[1], shape) if a.onnx else one(a.one[0], a.one[1], shape)
        print(json.dumps({"preset": a.one[0], **row}))
        return 0
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    for p in a.presets:
        for option in a.options:
            if option == "TTA, windows" and p == "cpu":
                continue  # the cpu grid is small: windows would only be forced for show
            extra = ["--onnx", str(export_random(p, work))] if option.startswith("ONNX") else []
            grid = "x".join(map(str, shape))
            r = subprocess.run([sys.executable, __file__, "--one", p, option, "--shape", grid, *extra],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr.strip().splitlines()[-1], file=sys.stderr)
                return 1
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [f"# Predictor.labels on one {shape[0]}x{shape[1]}x{shape[2]} scan, CPU ({cpu_model()}, "
             f"{os.cpu_count()} cores, 2 threads)", "", markdown_line(provenance()), "",
             "Peak resident memory of the whole process (Python, torch or ONNX Runtime, and the model included); "
             "random weights; "
             "the second of two calls is timed. \"windows\": Gaussian-weighted windows of half the grid per axis.", "",
             "| preset (network grid) | inference | s/volume | peak RSS (GB) |", "|---|---|---|---|"]
    lines += [f"| {r['preset']} ({'x'.join(map(str, r['grid']))}) | {r['option']} | {r['seconds']:.2f} | "
              f"{r['peak_rss_gb']:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
