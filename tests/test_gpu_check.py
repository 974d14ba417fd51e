"""`make gpu-check`: the dry run goes through every stage on the CPU, and without a GPU the real
run refuses in one line. (The GPU run itself needs a GPU machine.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_peak_lookup_by_card_name():
    """gpu_check reads the peaks of hipseg_lib.plan (one table)."""
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("Some Future Card") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the refusal cannot happen")
def test_no_gpu_is_a_one_line_refusal(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU"), r.stderr
    assert not (tmp_path / "r.md").exists()


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_dry.md"
    env = {**os.environ, "HIPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900,
                       env=env, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    text = out.read_text()
    figures = json.loads(out.with_suffix(".json").read_text())
    assert figures["failures"] == []
    assert figures["provenance"]["command"].startswith("python benchmarks/gpu_check.py --dry-run")
    assert "Provenance: commit " in text
    for name in gpu_check.FIGURES:
        assert name in figures, f"missing figure {name!r}"
        assert "missing" not in str(figures[name]) and "failed" not in str(figures[name]), (name, figures[name])
        if name not in ("models table", "loader table"):
            assert f"| {name} |" in text
    # The papermill run really trained and evaluated: numbers, not placeholders.
    assert figures["train s/step (papermill run)"] > 0 and figures["GFLOP per step"] > 0
    assert len(figures["test Dice (papermill run)"].split()) == 6
    assert figures["torchrun"].startswith("ok: gloo on cpu, world size 1")
    assert "hipseg-ResUNet3D" in figures["models table"] and "monai-UNet" in figures["models table"]
    assert "| hipseg-ResUNet3D+light_levels=2+top_kernel=0 |" in figures["models table"], "the lighter variant too"
    assert (tmp_path / "work" / "executed" / "04_training.ipynb").exists()
    # the loader benchmark ran where training runs (the CPU in the dry run), beside the scipy pipeline
    assert "| cpu | hipseg device (cpu) |" in figures["loader table"] and "| cpu | scipy, 1 worker |" in text
    assert float(figures["loader: device pipeline volumes/s"].split()[0]) > 0
    assert figures["planned full run (10 % MFU, real set)"].startswith("600 epochs, ")
