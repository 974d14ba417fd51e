"""benchmarks/bench_step.py: the library's own step, each layout and precision, rows with provenance."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from hipseg_lib.runtime import memory_layout, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_times_the_librarys_step_and_marks_its_layout(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--preset", "smoke",
                           "--device", "cpu", "--steps", "1", "--no-compile", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["provenance"]["command"].startswith("python benchmarks/bench_step.py --preset smoke")
    rows = doc["rows"]
    assert {(r["precision"], r["layout"]) for r in rows} >= {("fp32", "default"), ("fp32", "channels-last")}
    assert all(r["s_per_step"] > 0 for r in rows) and rows[0]["ratio_to_first"] == 1.0
    cpu = torch.device("cpu")
    for r in rows:
        fmt = memory_layout(cpu, resolve_precision(cpu, r["precision"]))
        wanted = {torch.contiguous_format: "default", torch.channels_last_3d: "channels-last"}[fmt]
        assert r["library_choice"] == (r["layout"] == wanted), r
