"""torchrun with 2 CPU processes (gloo) trains like one process with the same global batch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hipseg_lib.checkpoint import read_checkpoint
from hipseg_lib.config import make_config
from hipseg_lib.trainer import RunOptions, Trainer


def train(cfg, data, out):
    options = RunOptions(cache_dir=os.environ["HIPSEG_CACHE"], device="cpu", precision="fp32")
    return Trainer(cfg, data, out, options, progress=False, log=lambda s: None).fit()

pytestmark = pytest.mark.slow  # torchrun processes: `make test-fast` leaves it out


def test_two_gloo_processes_match_single_process(tiny_synth, tmp_path):
    common = dict(epochs=2, target_shape=(16, 16, 8), base_channels=4, depth=3)
    out2 = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hipseg_lib", "train", "--preset", "smoke", "--data", str(tiny_synth), "--out", str(out2),
           "--batch-size", "1", "--epochs", "2", "--target-shape", "16x16x8", "--base-channels", "4",
           "--depth", "3", "--precision", "fp32", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("best checkpoint:") == 1, "only rank 0 reports"
    # One set of files, written once by rank 0.
    assert sorted(p.name for p in out2.iterdir()) == ["last.pth", "new_model.pth", "train_log.jsonl"]
    log = [json.loads(line) for line in (out2 / "train_log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in log] == [1, 2]
    assert all(h["world_size"] == 2 for h in log), "both ranks stepped"

    single = train(make_config("smoke", batch_size=2, **common), tiny_synth, tmp_path / "one")
    np.testing.assert_allclose([h["loss"] for h in log], [h["loss"] for h in single.history], rtol=2e-3)
    np.testing.assert_allclose([v for v in log[-1]["val_dice"] if v is not None],
                               [v for v in single.history[-1]["val_dice"] if v is not None], atol=0.02)
    other = train(make_config("smoke", batch_size=2, **{**common, "seed": 1}), tiny_synth, tmp_path / "other")
    assert other.history[0]["loss"] != single.history[0]["loss"]

    def rel(x, y):
        a, b = (read_checkpoint(p / "last.pth")["model_state"] for p in (x, y))
        diff = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5
        return diff / sum(float(b[k].float().pow(2).sum()) for k in b) ** 0.5

    # The weights agree up to float rounding (summing gradients per rank vs per batch), which Adam
    # amplifies a little; a different seed gives weights an order of magnitude further away.
    assert rel(out2, tmp_path / "one") < 0.1 * rel(tmp_path / "other", tmp_path / "one")


# ``hipseg`` with rank 1 a second and a half late to its error line: torchrun stops every process
# as soon as one exits, so without waiting for the others, rank 0 would cut rank 1 off (a race
# that a busy machine loses now and then; the delay makes it lose every time).
SLOW_RANK_1 = """
import os, sys, time
import hipseg_lib
from hipseg_lib import cli
if os.environ["RANK"] == "1":
    def late_str(exc):
        time.sleep(1.5)
        return Exception.__str__(exc)
    hipseg_lib.HipsegError.__str__ = late_str
sys.exit(cli.main(sys.argv[1:]))
"""


def _torchrun_train(tmp_path, *args):
    script = tmp_path / "slow_rank_1.py"
    script.write_text(SLOW_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "train", "--preset", "smoke", "--device", "cpu", "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _ranks_fail_with_one_line(r, needle):
    """Every rank ends with the same one-line error and none prints a traceback (torchrun's own
    summary of the failed processes is not a rank's output)."""
    assert r.returncode != 0
    out = r.stdout + r.stderr
    # (the two processes may write their line at the same moment, so lines can run together)
    errors = re.findall(r"hipseg: error: (.*?)(?=hipseg: error:|\n|$)", out)
    assert len(errors) == 2 and all(needle in e for e in errors), errors
    assert len({e.strip() for e in errors}) == 1
    rank_lines = [line for line in out.splitlines() if line.startswith("[rank")]
    assert not any("Traceback" in line for line in rank_lines), "\n".join(rank_lines[:20])


def test_a_missing_data_folder_ends_every_rank_with_one_line(tmp_path):
    r = _torchrun_train(tmp_path, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m"))
    _ranks_fail_with_one_line(r, "no such folder")
    assert not (tmp_path / "m" / "last.pth").exists()


def test_an_error_only_rank_0_sees_ends_every_rank(tiny_synth, tmp_path):
    # Only rank 0 checks the output folder; rank 1 must not hang or crash in a collective.
    out = tmp_path / "m"
    out.mkdir()
    (out / "last.pth").write_bytes(b"an earlier run")
    r = _torchrun_train(tmp_path, "--data", str(tiny_synth), "--out", str(out))
    _ranks_fail_with_one_line(r, "holds checkpoints of an earlier run")
    assert (out / "last.pth").read_bytes() == b"an earlier run"


# ``hipseg`` whose rank 0 alone gets SIGUSR1 at the end of its first epoch's steps (a batch system
# may signal one process, or one before the others).
SIGNAL_RANK_0 = """
import os, signal, sys
from hipseg_lib import cli, trainer
if os.environ["RANK"] == "0":
    plain = trainer.train_epoch
    def signalled(*args):
        losses = plain(*args)
        if args[2] == 0:  # the epoch
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses
    trainer.train_epoch = signalled
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_signal_to_one_process_stops_every_process_after_the_epoch(tiny_synth, tmp_path):
    """The processes agree on a stop: without it, rank 0 would save while rank 1 trained on, each
    waiting for the other in a different collective, until the job's time ran out."""
    script = tmp_path / "signal_rank_0.py"
    script.write_text(SIGNAL_RANK_0)
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "train", "--preset", "smoke", "--device", "cpu", "--quiet", "--data", str(tiny_synth),
           "--out", str(out), "--epochs", "4", "--set", "val_every=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [1], "stopped after the signalled epoch"
    assert (out / "last.pth").exists() and (out / "new_model.pth").exists()
    assert "stopped: signal SIGUSR1: stopped after this epoch to resume later" in r.stdout + r.stderr
