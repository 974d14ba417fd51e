"""The conda environment and the pip requirements must list the same pinned packages."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower()] = version
    return out


def _environment() -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^\s*-\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", (ROOT / "environment.yml").read_text(), re.M):
        out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_matches_requirements():
    req, env = _requirements(), _environment()
    assert req, "requirements.txt lists packages"
    assert env == req


def test_the_environment_runs_what_is_pinned():
    """Every line of requirements.txt is an exact pin, and the packages this suite runs on are the
    pinned versions: a result measured here is a result of the pinned stack."""
    from importlib.metadata import version

    text = (ROOT / "requirements.txt").read_text()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][^\s=<>~!]*", line), f"not an exact pin: {line}"
    req = _requirements()
    for name in ("torch", "numpy", "nibabel", "matplotlib", "ipywidgets", "papermill", "jupyter-book",
                 "ruff", "mypy"):
        assert name in req, f"{name} is not pinned"
        installed = version(name).split("+")[0]
        assert installed == req[name], f"{name}: {installed} installed, {req[name]} pinned"


def test_runtime_dependencies_declared_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S).group(1)
    for name in ("torch", "numpy", "scipy", "nibabel", "matplotlib", "tqdm"):
        assert f'"{name}' in deps
    assert "monai" not in deps, "MONAI is a benchmark extra, never a runtime dependency"
