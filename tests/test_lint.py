"""The linter and the type checker, as part of the test suite: ruff on the library, the tests, the
benchmarks, the tools and the chapters' code cells (the rules pyproject.toml selects and defends;
80 characters in the chapters), mypy on hipseg_lib and the benchmarks with check_untyped_defs
(pyproject.toml holds both settings)."""
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
    """A chapter's code cell of 81 characters is flagged, one of 80 is not (the book's column)."""
    import json

    def lint(width: int) -> subprocess.CompletedProcess:
        line = "x = " + "1" * (width - 4)
        cell = {"cell_type": "code", "execution_count": None, "id": "probe", "metadata": {}, "outputs": [],
                "source": [line]}
        notebook = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        return subprocess.run([sys.executable, "-m", "ruff", "check", "--stdin-filename", "book/probe.ipynb",
                               "--output-format", "concise", "-"], input=json.dumps(notebook), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    wide, fits = lint(81), lint(80)
    assert wide.returncode == 1 and "E501 Line too long (81 > 80)" in wide.stdout, wide.stdout + wide.stderr
    assert fits.returncode == 0, fits.stdout + fits.stderr


def test_mypy_finds_nothing_in_the_library_or_the_benchmarks():
    r = _run("mypy")
    assert r.returncode == 0 and "Success" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
