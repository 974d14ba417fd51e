"""Training killed with SIGKILL at any moment leaves a loadable checkpoint; resume finishes the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hipseg_lib.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow  # training killed and resumed: `make test-fast` leaves it out

EPOCHS = 24


def _train_cmd(data, out, resume=False):
    cmd = [sys.executable, "-m", "hipseg_lib", "train", "--preset", "smoke", "--data", str(data), "--out", str(out),
           "--epochs", str(EPOCHS), "--target-shape", "16x16x8", "--base-channels", "4", "--depth", "3",
           "--precision", "fp32", "--device", "cpu", "--quiet"]
    return cmd + (["--resume"] if resume else [])


def _wait_for_new_checkpoint(path, after_ns, proc, timeout=120):
    """Wait until ``path`` is newer than ``after_ns``; its new mtime, or None if the run ended first."""
    t = time.time()
    while time.time() - t < timeout:
        if path.exists() and path.stat().st_mtime_ns > after_ns:
            return path.stat().st_mtime_ns
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    return None


def test_sigkill_at_several_points_then_resume(tiny_synth, tmp_path):
    out = tmp_path / "run"
    last = out / "last.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs_seen = []
    # Kill right after a checkpoint appears, and at fractions of an epoch later, inside later epochs
    # and writes. The delays are measured in epochs of this machine, so that however fast or
    # loaded it is, every kill lands well before the run's end.
    epoch_s = None
    for fraction in (0.0, 0.3, 0.6, 0.9):
        proc = subprocess.Popen(_train_cmd(tiny_synth, out, resume=last.exists()), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=env)
        before = last.stat().st_mtime_ns if last.exists() else 0
        seen = _wait_for_new_checkpoint(last, before, proc)
        assert seen, proc.stderr.read().decode()[-2000:]
        if epoch_s is None:  # the first run: time one epoch (checkpoint to checkpoint)
            t = time.perf_counter()
            assert _wait_for_new_checkpoint(last, seen, proc), proc.stderr.read().decode()[-2000:]
            epoch_s = time.perf_counter() - t
        time.sleep(fraction * epoch_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = read_checkpoint(last)  # never truncated
        epochs_seen.append(ck["epoch"])
        assert ck["history"][-1]["epoch"] == ck["epoch"] + 1
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] < EPOCHS - 1, "killed before the end each time"
    done = subprocess.run(_train_cmd(tiny_synth, out, resume=True), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ck = read_checkpoint(last)
    assert ck["epoch"] == EPOCHS - 1
    assert [h["epoch"] for h in ck["history"]] == list(range(1, EPOCHS + 1))
    log = [json.loads(line)["epoch"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, EPOCHS + 1))
    assert not list(out.glob(".*.tmp")), "no temporary files left"
    read_checkpoint(out / "new_model.pth")
    # Killed four times and resumed, the run ends with the weights of a run never interrupted
    # (fp32 on the CPU: exactly the same numbers), and the same losses on the way.
    straight = subprocess.run(_train_cmd(tiny_synth, tmp_path / "straight"), capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]
    other = read_checkpoint(tmp_path / "straight" / "last.pth")
    assert all(torch.equal(ck["model_state"][k], other["model_state"][k]) for k in other["model_state"])
    assert [h["loss"] for h in ck["history"]] == [h["loss"] for h in other["history"]]
