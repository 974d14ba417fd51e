"""benchmarks/bench_models.py: the networks train in turns and each gets the same budget."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_networks_train_in_turns_of_the_same_budget(tmp_path, tiny_synth):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--preset", "smoke",
                           "--data", str(tiny_synth), "--cache-dir", str(tmp_path / "cache"),
                           "--minutes", "0.05", "--slice", "1", "--out", str(out),
                           "--models", "hipseg-ResUNet3D", "monai-UNet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "models_cpu.json").read_text())
    assert [r["model"] for r in rows] == ["hipseg-ResUNet3D", "monai-UNet"]
    for r in rows:
        assert r["turns"] == 3, "3 s of training in turns of 1 s"
        # Each network trains its budget and stops at the first step that reaches it.
        assert r["trained_s"] - r["last_step_s"] < 3.0 <= r["trained_s"]
        assert r["steps"] > 0 and len(r["test_dice"]) == 6
    assert "in turns of 1 s" in (out / "models_cpu.md").read_text()
