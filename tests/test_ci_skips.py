"""A browser test without a browser: skipped on a developer's machine, a failure in CI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_browser_tests(ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's tools, no chromium
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
                           str(ROOT / "tests" / "test_browser.py")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(ROOT))


def test_missing_chromium_fails_in_ci_and_skips_elsewhere():
    here = _run_browser_tests(ci=False)
    assert here.returncode == 0 and "skipped" in here.stdout and "failed" not in here.stdout, here.stdout[-2000:]
    ci = _run_browser_tests(ci=True)
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "in CI a missing browser fails instead of skipping" in ci.stdout
    assert "skipped" not in ci.stdout.split("\n")[-2]
