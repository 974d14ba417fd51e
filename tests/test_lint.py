"""The linter and the type checker, as part of the test suite: ruff on the library, the tests, the
benchmarks, the tools and the chapters' code cells (pyflakes, pycodestyle, import order, bugbear;
80 characters in the chapters), mypy on hipseg_lib (pyproject.toml holds both settings)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    r = _run("ruff", "check", ".")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_reads_the_chapters_at_their_column_width():
    r = _run("ruff", "check", "--show-settings", "book/01_data_exploration.ipynb")
    assert r.returncode == 0 and "line-length = 80" in r.stdout and '"book/' in r.stdout or "ipynb" in r.stdout


def test_mypy_finds_nothing_in_the_library():
    r = _run("mypy")
    assert r.returncode == 0 and "Success" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
