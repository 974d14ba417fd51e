"""Every results file says where its figures came from (commit, torch, CPU and bf16, GPU, threads,
date, command), so that a reader can rerun any row; the benchmarks write it themselves."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import provenance as P  # noqa: E402

LINE = re.compile(r"^Provenance: commit (?P<commit>.+?), (?P<date>\d{4}-\d\d-\d\d), torch (?P<torch>.+?); "
                  r"CPU: (?P<cpu>.+) \(native bf16: (?P<bf16>.+?), kernels (?P<kernels>.+?)\), "
                  r"GPU: (?P<gpu>.+?), (?P<threads>.+?) threads\. Command: `(?P<command>[^`]+)`\.")


def _provenance_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Provenance")]


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.md")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_markdown_result_names_its_provenance(path):
    lines = _provenance_lines(path.read_text())
    assert lines, f"{path.name}: no Provenance line"
    assert lines[0] in path.read_text().splitlines()[:4], "it stands under the title"
    assert LINE.match(lines[0]), lines[0]


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_json_result_names_its_provenance(path):
    doc = json.loads(path.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("provenance"), dict), path.name
    assert set(P.FIELDS) <= set(doc["provenance"]), set(P.FIELDS) - set(doc["provenance"])
    assert "None" not in {str(r["amp"]) for r in doc.get("rows", []) if isinstance(r, dict) and "amp" in r}, \
        "precision is named (fp32, bf16, fp16), not a missing dtype"
    md = path.with_suffix(".md")
    assert md.exists() and _provenance_lines(md.read_text()), "the table a reader sees carries it too"


def test_this_process_provenance_is_measured(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    prov = P.provenance([str(ROOT / "benchmarks" / "bench_step.py"), "--steps", "2"])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert prov["commit"].split()[0] == head
    assert prov["torch"] == torch.__version__ and prov["threads"] == torch.get_num_threads()
    from hipseg_lib.runtime import cpu_has_bf16
    assert prov["cpu_native_bf16"] is cpu_has_bf16()
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert prov["command"] == "python benchmarks/bench_step.py --steps 2"
    assert prov["environment"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "an AVX2-emulated run says so"
    line = P.markdown_line(prov)
    m = LINE.match(line)
    assert m and m["command"] == "ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_step.py --steps 2", line
    assert m["bf16"] == str(cpu_has_bf16()) and m["gpu"] == "none"
    text = P.with_provenance("# Title\n\n| a |\n|---|\n", prov)
    assert text.splitlines()[:3] == ["# Title", "", line]
