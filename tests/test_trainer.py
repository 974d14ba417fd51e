"""The production trainer (hipseg train): the core's functions composed, plus resuming, a time limit,
signals, fp16's scaler, compilation and the log."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from hipseg_lib import BEST_NAME, LAST_NAME, LOG_NAME, HipsegError
from hipseg_lib.checkpoint import read_checkpoint
from hipseg_lib.config import make_config
from hipseg_lib.runs import archive_previous_run
from hipseg_lib.train import fit, prepare_data
from hipseg_lib.trainer import RunOptions, Trainer, time_limited_epochs

CPU = torch.device("cpu")


def smoke(**kw):
    return make_config("smoke", **{**dict(epochs=2, target_shape=(16, 16, 8), base_channels=4, depth=3), **kw})


def run(cfg, data, out, resume=False, log=lambda s: None, **options):
    opts = RunOptions(cache_dir=os.environ["HIPSEG_CACHE"], precision=options.pop("precision", "fp32"), **options)
    return Trainer(cfg, data, out, opts, resume=resume, progress=False, log=log).fit()


def test_the_trainer_trains_the_model_fit_trains(tiny_synth, tmp_path):
    """The chapter's loop and hipseg train compose the same step, epoch, validation and schedule:
    the same weights, to the last bit, and the same records."""
    data = prepare_data(smoke(), tiny_synth, os.environ["HIPSEG_CACHE"], CPU)
    history = fit(smoke(), data, tmp_path / "fit", CPU, "fp32", log=lambda s: None)
    result = run(smoke(), tiny_synth, tmp_path / "trainer")
    for name in (BEST_NAME, LAST_NAME):
        a = read_checkpoint(tmp_path / "fit" / name)["model_state"]
        b = read_checkpoint(tmp_path / "trainer" / name)["model_state"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for mine, theirs in zip(history, result.history):
        assert mine["loss"] == theirs["loss"] and mine["val_loss"] == pytest.approx(theirs["val_loss"])
        assert mine["val_dice"] == pytest.approx([math.nan if d is None else d for d in theirs["val_dice"]],
                                                 nan_ok=True)


def test_log_and_checkpoints(tiny_synth, tmp_path):
    r = run(smoke(), tiny_synth, tmp_path / "a")
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} == {BEST_NAME, LAST_NAME, LOG_NAME}
    lines = [json.loads(t) for t in (out / LOG_NAME).read_text().splitlines()]
    assert lines == json.loads(json.dumps(r.history)), "the log is the run's history, line for line"
    ck = read_checkpoint(out / LAST_NAME)
    assert ck["epoch"] == 1 and ck["class_names"][5] == "prostate" and ck["library_version"]
    assert r.stopped_because == "planned 2 epochs done"


def test_refuses_to_overwrite_and_resume_continues_as_if_never_stopped(tiny_synth, tmp_path):
    out = tmp_path / "run"
    first = run(smoke(), tiny_synth, out, max_minutes=1e-6)  # cut after epoch 1 of 2
    assert len(first.history) == 1 and "time limit" in first.stopped_because
    with pytest.raises(HipsegError, match="holds checkpoints of an earlier run"):
        run(smoke(), tiny_synth, out)
    r = run(smoke(), tiny_synth, out, resume=True)
    assert [h["epoch"] for h in r.history] == [1, 2]
    straight = run(smoke(), tiny_synth, tmp_path / "straight")
    assert [h["loss"] for h in r.history] == [h["loss"] for h in straight.history]
    a, b = (read_checkpoint(d / LAST_NAME)["model_state"] for d in (out, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in b), "fp32 on a CPU: the same weights"
    with pytest.raises(HipsegError, match="was trained with base_channels=4"):
        run(smoke(epochs=3, base_channels=8), tiny_synth, out, resume=True)
    with pytest.raises(HipsegError, match=r"was trained with lr=.*only epochs, val_every"):
        run(smoke(epochs=3, lr=1e-4), tiny_synth, out, resume=True)
    with pytest.raises(HipsegError, match="nothing to resume"):
        run(smoke(), tiny_synth, tmp_path / "empty", resume=True)
    # A run of 2 processes (each its own batches: other steps per epoch) resumed by 1 is refused
    ck = read_checkpoint(out / LAST_NAME)
    torch.save({**ck, "world_size": 2, "rng_states": ck["rng_states"] * 2}, out / LAST_NAME)
    with pytest.raises(HipsegError, match=r"trained by 2 process\(es\), this run has 1; .* resume with as many"):
        run(smoke(epochs=3), tiny_synth, out, resume=True)


def test_the_best_checkpoint_is_written_before_last_pth_that_names_its_score(tiny_synth, tmp_path, monkeypatch):
    """A run killed between the two writes must not leave last.pth promising a best score that
    new_model.pth does not hold (a later epoch would have to beat a score nothing was saved for)."""
    import hipseg_lib.trainer as T

    written = []
    real = T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", lambda path, *a, **kw: written.append(path.name) or real(path, *a, **kw))
    run(smoke(epochs=1), tiny_synth, tmp_path / "run")
    assert written == [BEST_NAME, LAST_NAME]


def test_a_signal_ends_the_run_after_its_epoch_with_last_pth(tiny_synth, tmp_path):
    """A batch system's warning (SIGUSR1) before its time limit: last.pth is written, and --resume
    finishes the run as if it had never stopped."""
    out = tmp_path / "sig"
    lines = []

    def log(line):
        lines.append(line)
        if line.startswith("epoch 1/"):
            os.kill(os.getpid(), signal.SIGUSR1)

    first = run(smoke(epochs=3), tiny_synth, out, log=log)
    assert "signal SIGUSR1" in first.stopped_because and len(first.history) == 2, "the epoch under way ends"
    assert read_checkpoint(out / LAST_NAME)["epoch"] == 1
    rest = run(smoke(epochs=3), tiny_synth, out, resume=True)
    straight = run(smoke(epochs=3), tiny_synth, tmp_path / "straight")
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in straight.history]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, "the handler is put back"



def test_resuming_with_more_epochs_spreads_the_decay_over_them(tiny_synth, tmp_path):
    """A finished run resumed with a larger `epochs` trains on at a rate that decays anew to zero
    at the new end (else the schedule, already at zero, would train the added epochs at lr 0)."""
    out = tmp_path / "more"
    first = run(smoke(epochs=2), tiny_synth, out)
    assert first.history[-1]["lr"] == 0.0
    more = run(smoke(epochs=4), tiny_synth, out, resume=True)
    assert [h["epoch"] for h in more.history] == [1, 2, 3, 4]
    assert more.history[2]["lr"] > 0.0 and more.history[-1]["lr"] == 0.0

def test_time_limited_epochs():
    assert time_limited_epochs([60, 60], math.inf, 2, 12) == 12
    assert time_limited_epochs([60, 60], 3600, 2, 12) == 12, "fits"
    assert time_limited_epochs([60, 60], 300, 2, 12) == 5
    assert time_limited_epochs([60, 60], 100, 2, 12) == 2, "never fewer than done"
    assert time_limited_epochs([300, 60, 60], 600, 3, 12) == 6, "a slow first epoch is left out"


def test_a_run_cut_short_by_the_time_limit_still_ends_at_zero_lr(tiny_synth, tmp_path, monkeypatch):
    import hipseg_lib.trainer as T

    monkeypatch.setattr(T, "time_limited_epochs", lambda walls, budget, done, planned: min(planned, 2))
    msgs = []
    r = run(smoke(epochs=4), tiny_synth, tmp_path / "cut", log=msgs.append, max_minutes=5)
    assert len(r.history) == 2 and r.history[-1]["lr"] == 0.0
    assert r.stopped_because == "time limit of 5 minutes: stopped after 2 of 4 planned epochs"
    assert any(m.startswith("WARNING: time limit of 5 min: at the speed measured so far this machine fits 2 of 4")
               for m in msgs)


def test_gpu_path_features_run_on_a_cpu(tiny_synth, tmp_path, monkeypatch):
    """bf16, fp16 with its scaler and the torch.compile fallback train on the CPU, like fp32 up to rounding."""
    calls = []

    def broken_compile(model, *a, **k):  # as when no compiler toolchain works: fails at the first call
        def compiled(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("backend compiler failed")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    fp32 = run(smoke(), tiny_synth, tmp_path / "f")
    with pytest.warns(UserWarning, match="torch.compile failed"):
        bf16 = run(smoke(), tiny_synth, tmp_path / "g", precision="bf16", compile=True)
    assert calls == [1], "tried once, then eager"
    fp16 = run(smoke(), tiny_synth, tmp_path / "h", precision="fp16")
    for other in (bf16, fp16):
        for a, b in zip(fp32.history, other.history):
            assert abs(a["loss"] - b["loss"]) < 0.03 * a["loss"], (a["loss"], b["loss"])


def test_archive_previous_run_keeps_files(tiny_synth, tmp_path):
    out = tmp_path / "run"
    assert archive_previous_run(out) is None
    run(smoke(epochs=1), tiny_synth, out)
    before = (out / BEST_NAME).read_bytes()
    moved = archive_previous_run(out)
    assert moved is not None and (moved / BEST_NAME).read_bytes() == before
    assert not (out / BEST_NAME).exists()


def test_a_folder_written_by_fit_is_refused_for_resuming_in_one_line(tiny_synth, tmp_path):
    """fit (the chapters' loop) keeps no optimiser state: --resume on its folder says so."""
    cfg = smoke(epochs=1)
    data = prepare_data(cfg, tiny_synth, tmp_path / "cache", torch.device("cpu"))
    fit(cfg, data, tmp_path / "chapter", torch.device("cpu"), "fp32", log=lambda s: None)
    with pytest.raises(HipsegError, match="written by fit .* cannot be resumed"):
        run(smoke(epochs=2), tiny_synth, tmp_path / "chapter", resume=True)

