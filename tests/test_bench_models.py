"""benchmarks/bench_models.py: the networks train in turns and each gets the same budget."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark runs: `make test-fast` leaves it out

ROOT = Path(__file__).resolve().parents[1]


def test_networks_train_in_turns_of_the_same_budget(tmp_path, tiny_synth):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--preset", "smoke",
                           "--data", str(tiny_synth), "--cache-dir", str(tmp_path / "cache"),
                           "--minutes", "0.05", "--slice", "1", "--out", str(out), "--seed", "3",
                           "--models", "hipseg-ResUNet3D", "monai-UNet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "models_cpu.json").read_text())
    rows = doc["rows"]
    assert doc["provenance"]["command"].startswith("python benchmarks/bench_models.py --preset smoke")
    from hipseg_lib.runtime import cpu_has_bf16
    assert {r["amp"] for r in rows} == {"bf16" if cpu_has_bf16() else "fp32"}, "amp=auto, named"
    assert (out / "models_cpu.md").read_text().startswith("Provenance: commit ")
    assert [r["model"] for r in rows] == ["hipseg-ResUNet3D", "monai-UNet"]
    for r in rows:
        assert r["turns"] == 3, "3 s of training in turns of 1 s"
        # Each network trains its budget and stops at the first step that reaches it.
        assert r["trained_s"] - r["last_step_s"] < 3.0 <= r["trained_s"]
        assert r["steps"] > 0 and len(r["val_dice"]) == 6 and r["seed"] == 3
    assert "in turns of 1 s, seed 3" in (out / "models_cpu.md").read_text()


def test_monai_with_hipseg_convolutions_is_the_same_network(monkeypatch):
    import torch

    from hipseg_lib.cpu_kernels import CPUConv3d

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_models

    base, variant = bench_models.split_variant("monai-UNet+conv=hipseg")
    assert (base, variant) == ("monai-UNet", {"conv": "hipseg"})
    net = bench_models._monai(base, 4, 3).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    before = net(x)
    bench_models.use_cpu_kernels(net)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(type(m) is CPUConv3d for m in convs)
    assert torch.allclose(net(x), before, atol=1e-5)
