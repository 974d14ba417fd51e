"""`make gpu-check`: the dry run goes through every stage on the CPU, each stage's figures reach the
results file as the stage ends (a failing stage or a stopped command loses nothing else), and
without a GPU the real run refuses in one line. (The GPU run itself needs a GPU machine.)"""
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


def test_a_slow_kernel_is_found_among_any_number_of_names():
    """The detector reads every kernel name, not only the first 25 listed in the results."""
    names = [f"aaa_conv_kernel_{i:03d}" for i in range(40)] + ["aten::slow_conv_transpose3d"]
    assert gpu_check.slow_kernels(names) == ["aten::slow_conv_transpose3d"]
    assert gpu_check.slow_kernels(["cudnn::conv3d_fprop_implicit_gemm"]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the refusal cannot happen")
def test_no_gpu_is_a_one_line_refusal(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU"), r.stderr
    assert not (tmp_path / "r.md").exists()


def test_the_default_run_is_planned_within_eight_minutes():
    assert sum(budget for _, _, budget in gpu_check.STAGES) <= 8 * 60
    assert gpu_check.STAGE_NAMES[:3] == ("versions", "numerics", "speed"), "correctness first"


def _dry_run(tmp_path, *extra):
    out = tmp_path / "gpu_dry.md"
    env = {**os.environ, "HIPSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2",
           "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--work", str(tmp_path / "work"), *extra], capture_output=True, text=True, timeout=1200,
                       env=env, cwd=str(ROOT))
    doc = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None
    return r, out, doc


@pytest.mark.slow
def test_dry_run_with_a_failing_stage_keeps_every_other_stage(tmp_path):
    r, out, doc = _dry_run(tmp_path, "--fail-stage", "inference")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == \
        "gpu-check: stage 'inference' failed: forced to fail (--fail-stage inference)"
    status = {s["name"]: s["status"] for s in doc["stages"]}
    assert list(status) == list(gpu_check.STAGE_NAMES)
    assert status.pop("inference") == "failed" and set(status.values()) == {"ok"}, status
    fig = {s["name"]: s["figures"] for s in doc["stages"]}
    assert fig["versions"]["torch"] == torch.__version__
    assert fig["numerics"]["network bf16 arg-max agreement"] >= gpu_check.ARGMAX_AGREEMENT
    assert fig["speed"]["s/step eager"] > 0 and fig["speed"]["GFLOP per step"] > 0
    epochs = fig["epochs"]
    assert epochs["epoch s: training steps"] > 0 and epochs["epoch s: validation"] > 0
    assert epochs["epoch s: checkpoints"] > 0 and "Self CPU" in epochs["table"]
    assert (tmp_path / "out" / "gpu_check_profile.txt").exists(), "the profiler table goes to $OUT"
    assert "== models" in (tmp_path / "out" / "gpu_check.log").read_text(), "and the log"
    assert len(fig["chapters"]["test Dice per patient (3 epochs: not a result)"].split()) == 5
    resume = fig["resume"]
    assert resume["resumed within the noise"] is True
    assert resume["two uninterrupted runs: largest weight difference"] == 0.0, "the CPU is deterministic"
    assert resume["resumed against uninterrupted: largest weight difference"] == 0.0
    assert fig["torchrun"]["torchrun"].startswith("ok: gloo on cpu, world size 1")
    assert "monai-UNet" in fig["models"]["table"] and "hipseg-ResUNet3D" in fig["models"]["table"]
    assert (tmp_path / "work" / "executed" / "04_training.ipynb").exists()
    text = out.read_text()
    assert "## inference: failed" in text
    assert text.splitlines()[2].startswith("Provenance: commit "), "provenance under the title"
    assert doc["provenance"]["command"].startswith("python benchmarks/gpu_check.py --dry-run")


@pytest.mark.slow
def test_a_check_stopped_midway_keeps_the_stages_that_ended(tmp_path):
    r, out, doc = _dry_run(tmp_path, "--stages", "versions,numerics,speed,data,torchrun", "--kill-at", "torchrun")
    assert r.returncode == 3, r.stderr[-2000:]
    assert [s["name"] for s in doc["stages"]] == ["versions", "numerics", "speed", "data"]
    assert all(s["status"] == "ok" for s in doc["stages"])
    assert "## speed: ok" in out.read_text()


def test_no_speed_is_reported_when_the_numbers_are_wrong(tmp_path, monkeypatch):
    """A numerical stage that fails (say bf16 convolutions give wrong results) stops the speed stage."""
    from hipseg_lib.config import make_config

    monkeypatch.setattr(gpu_check, "CONV_RELATIVE_ERROR", 0.0)  # as if bf16 were wrong
    cfg = make_config("full").replace(target_shape=(16, 16, 8), base_channels=4, depth=3, batch_size=1)
    ctx = gpu_check.Context(True, torch.device("cpu"), cfg, tmp_path, lambda s: None, 1)
    results = gpu_check.Results(tmp_path / "r.md", {"device": "CPU"})
    failures = gpu_check.run_stages(ctx, ["versions", "numerics", "speed"], results, 10, set(), None, 20.0)
    status = {s["name"]: s["status"] for s in results.stages}
    assert status == {"versions": "ok", "numerics": "failed", "speed": "skipped"}
    assert "conv3d bf16 relative error" in failures[0]
    assert not results.stages[2]["figures"]
