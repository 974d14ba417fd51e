"""Where a benchmark's figures came from: one record for every results file.

Every file under ``benchmarks/results/`` carries it (``tests/test_results_provenance.py`` checks):
JSON files as a top-level ``"provenance"`` object next to their ``"rows"``, Markdown files as one
``Provenance:`` line under the title. With it a reader can rerun any row: the commit (and whether
the tree had uncommitted changes), torch, the CPU model, whether it has native bf16 and which
kernels torch used, the GPU, threads, the date and the exact command, with the environment
variables that change the kernels (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``: an
AVX2-emulated run says so).
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from hipseg_lib.runtime import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]
KERNEL_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")
FIELDS = ("commit", "torch", "cpu", "cpu_native_bf16", "cpu_capability", "gpu", "threads", "date",
          "command", "environment")


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + (" with uncommitted changes" if head and dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the project folder: ``python benchmarks/x.py ARGS``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, argv[1:])])


def provenance(argv: list[str] | None = None) -> dict:
    """The record for this process (``argv`` defaults to ``sys.argv``, script first)."""
    return {"commit": _commit(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_native_bf16": cpu_has_bf16(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "command": command_line(argv),
            "environment": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}}


def markdown_line(prov: dict) -> str:
    """One line for a Markdown results file."""
    env = " ".join(f"{k}={v}" for k, v in (prov.get("environment") or {}).items())
    return (f"Provenance: commit {prov['commit']}, {prov['date']}, torch {prov['torch']}; "
            f"CPU: {prov['cpu']} (native bf16: {prov['cpu_native_bf16']}, kernels "
            f"{prov['cpu_capability']}), GPU: {prov['gpu'] or 'none'}, {prov['threads']} threads. "
            f"Command: `{(env + ' ') if env else ''}{prov['command']}`."
            + (f" {prov['note']}" if prov.get("note") else ""))


def with_provenance(markdown: str, prov: dict) -> str:
    """``markdown`` with the provenance line under its title (or first, when it has none)."""
    lines = markdown.splitlines()
    at = 1 if lines and lines[0].startswith("# ") else 0
    rest = lines[at:]
    while rest and not rest[0].strip():
        rest.pop(0)
    block = ([""] if at else []) + [markdown_line(prov), ""]
    return "\n".join(lines[:at] + block + rest).rstrip("\n") + "\n"
