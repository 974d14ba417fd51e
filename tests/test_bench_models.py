"""benchmarks/bench_models.py: every network is trained by the library's own loop (fit)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark runs: `make test-fast` leaves it out

ROOT = Path(__file__).resolve().parents[1]


def test_every_network_is_trained_by_the_librarys_fit(tmp_path, tiny_synth, monkeypatch):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--preset", "smoke",
                           "--data", str(tiny_synth), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
                           "--out", str(out), "--seed", "3", "--precision", "fp32",
                           "--models", "hipseg-ResUNet3D", "monai-UNet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "models_cpu_fp32.json").read_text())
    assert doc["provenance"]["command"].startswith("python benchmarks/bench_models.py --preset smoke")
    assert (out / "models_cpu_fp32.md").read_text().startswith("# hipseg against MONAI")
    rows = doc["rows"]
    assert [r["model"] for r in rows] == ["hipseg-ResUNet3D", "monai-UNet"]
    assert all(r["epochs"] == 1 and r["step_s"] > 0 and len(r["val_dice"]) == 6 for r in rows)
    # the hipseg row is what the library's fit() gives for the same settings
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_models
    import torch

    from hipseg_lib.config import make_config
    from hipseg_lib.train import fit, prepare_data

    cfg = make_config("smoke", epochs=1, seed=3)
    data = prepare_data(cfg, tiny_synth, tmp_path / "cache", torch.device("cpu"))
    history = fit(cfg, data, tmp_path / "m", torch.device("cpu"), "fp32", log=lambda s: None)
    assert rows[0]["val_dice"] == pytest.approx(history[0]["val_dice"], nan_ok=True)
    assert bench_models.build("monai-UNet", cfg).__class__.__name__ == "UNet"
