"""A training run never loses its last good state: the run that ends always validates its last
epoch and leaves a best checkpoint; a non-finite loss stops it with the checkpoints intact; a
resumed run continues every process's random state."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hipseg_lib import BEST_NAME, LAST_NAME
from hipseg_lib.checkpoint import read_checkpoint
from hipseg_lib.config import make_config
from hipseg_lib.train import NonFiniteLoss
from hipseg_lib.trainer import RunOptions, Trainer


def _smoke(**kw):
    base = dict(epochs=2, batch_size=2, target_shape=(16, 16, 8), base_channels=4, depth=3)
    return make_config("smoke", **{**base, **kw})


def train(cfg, data, out, max_minutes=0.0, **kw):
    options = RunOptions(cache_dir=os.environ["HIPSEG_CACHE"], precision="fp32", max_minutes=max_minutes)
    return Trainer(cfg, data, out, options, **kw).fit()


def _finite(path) -> bool:
    return all(bool(torch.isfinite(v.float()).all()) for v in read_checkpoint(path)["model_state"].values())


def test_a_run_the_time_limit_stops_between_validations_validates_its_last_epoch(tiny_synth, tmp_path):
    """40 epochs planned, validation every 5, a time limit that ends the run after its first epoch:
    that epoch is validated, so the run leaves a best checkpoint holding it."""
    out = tmp_path / "m"
    r = train(_smoke(epochs=40, val_every=5), tiny_synth, out, max_minutes=1e-6, progress=False,
              log=lambda s: None)
    assert "time limit" in r.stopped_because and len(r.history) == 1
    assert r.best_path == out / BEST_NAME and r.best_path.exists()
    best, last = read_checkpoint(out / BEST_NAME), read_checkpoint(out / LAST_NAME)
    assert best["epoch"] == last["epoch"] == 0 and "val_dice" in best["history"][-1]
    assert r.best_val_dice == best["history"][-1]["val_dice"]


def test_a_shortened_run_validates_its_fully_decayed_last_epoch(tiny_synth, tmp_path, monkeypatch):
    """As on a slow machine: after epoch 1 the budget fits 3 of 10 epochs (validation every 5): epoch
    3, whose learning rate has decayed to zero, is validated and can be the best."""
    import hipseg_lib.trainer as T

    monkeypatch.setattr(T, "time_limited_epochs", lambda walls, budget, done, planned: min(planned, 3))
    r = train(_smoke(epochs=10, val_every=5), tiny_synth, tmp_path / "m", max_minutes=5, progress=False,
              log=lambda s: None)
    assert len(r.history) == 3 and r.history[-1]["lr"] == 0.0
    assert "val_dice" in r.history[-1] and not any("val_dice" in h for h in r.history[:2])
    assert read_checkpoint(r.best_path)["epoch"] == 2


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoints(tiny_synth, tmp_path, monkeypatch):
    import hipseg_lib.trainer as T

    out = tmp_path / "m"
    steps = train(_smoke(epochs=1), tiny_synth, tmp_path / "probe", progress=False,
                  log=lambda s: None).history[0]["steps"]
    real, calls = T.training_step, []

    def turning_nan(*args, **kwargs):  # from step 3 of epoch 2 on, the loss is NaN (as an overflow)
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= steps + 3 else loss

    monkeypatch.setattr(T, "training_step", turning_nan)
    with pytest.raises(NonFiniteLoss, match="at epoch 2, step 3"):
        train(_smoke(epochs=4), tiny_synth, out, progress=False, log=lambda s: None)
    last, best = read_checkpoint(out / LAST_NAME), read_checkpoint(out / BEST_NAME)
    assert last["epoch"] == best["epoch"] == 0, "the files still hold epoch 1"
    assert _finite(out / LAST_NAME) and _finite(out / BEST_NAME)


def test_the_command_line_ends_a_non_finite_run_with_one_line_and_status_1(tiny_synth, tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "hipseg_lib", "train", "--preset", "smoke", "--data", str(tiny_synth),
                        "--out", str(out), "--epochs", "3", "--set", "lr=1e12", "--set", "grad_clip=0", "--quiet",
                        "--precision", "fp32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hipseg: error: ") and "epoch" in lines[0] \
        and "step" in lines[0], r.stderr
    assert "best checkpoint" not in r.stdout
    for name in (LAST_NAME, BEST_NAME):
        assert not (out / name).exists() or _finite(out / name)


EPOCHS = 6


def _torchrun_train(data, out, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hipseg_lib", "train", "--preset", "smoke", "--data", str(data), "--out", str(out),
           "--batch-size", "1", "--epochs", str(EPOCHS), "--target-shape", "16x16x8", "--base-channels", "4",
           "--depth", "3", "--precision", "fp32", "--device", "cpu", "--set", "dropout=0.3", "--quiet"]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow  # torchrun processes
def test_resume_on_two_processes_continues_each_ranks_random_state(tiny_synth, tmp_path):
    """With dropout, each process draws from its own generator (seeded per rank). A two-process run
    killed after a checkpoint and resumed ends with exactly the weights of one never interrupted:
    each rank got its own random state back, not rank 0's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_train(tiny_synth, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    deadline = time.time() + 300
    while not (out / LAST_NAME).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # torchrun starts its workers in sessions of their own: kill every process of this run by its folder
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--out {out} "], check=False)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while subprocess.run(["pgrep", "-f", "--", f"--out {out} "], capture_output=True).returncode == 0:
        time.sleep(0.05)
    killed_at = read_checkpoint(out / LAST_NAME)
    assert killed_at["epoch"] < EPOCHS - 1, "killed before the end"
    assert len(killed_at["rng_states"]) == 2 and not torch.equal(killed_at["rng_states"][0]["cpu"],
                                                                 killed_at["rng_states"][1]["cpu"])
    done = subprocess.run(_torchrun_train(tiny_synth, out, resume=True), capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    straight = subprocess.run(_torchrun_train(tiny_synth, tmp_path / "straight"), capture_output=True, text=True,
                              env=env, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = read_checkpoint(out / LAST_NAME)
    b = read_checkpoint(tmp_path / "straight" / LAST_NAME)
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])
