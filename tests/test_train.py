from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hipseg_lib import BEST_NAME, LAST_NAME, LOG_NAME, HipsegError
from hipseg_lib.checkpoint import read_checkpoint
from hipseg_lib.config import PRESETS, make_config
from hipseg_lib.runs import archive_previous_run
from hipseg_lib.runtime import autocast_for, resolve_device
from hipseg_lib.train import PolySchedule, early_stop_reason, time_limited_epochs, train


def _smoke(**kw):
    base = dict(epochs=2, batch_size=2, target_shape=(16, 16, 8), base_channels=4, depth=3, amp="off")
    base.update(kw)
    return make_config("smoke", **base)


def test_presets_are_valid_and_overridable():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.preset == name
    assert make_config("cpu", epochs=3).epochs == 3
    assert make_config("auto").preset == ("full" if torch.cuda.is_available() else "cpu")
    with pytest.raises(HipsegError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown training settings: colour"):
        make_config("cpu").replace(colour="red")
    with pytest.raises(ValueError, match="divisible"):
        make_config("cpu", target_shape=(30, 30, 30))


def test_autocast_choices_on_cpu():
    off = autocast_for(torch.device("cpu"), "off")
    assert off.dtype is None and off.name == "fp32"
    bf16 = autocast_for(torch.device("cpu"), "bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.name == "bf16"
    from hipseg_lib.runtime import cpu_has_bf16
    assert autocast_for(torch.device("cpu"), "auto").name == ("bf16" if cpu_has_bf16() else "fp32")
    with bf16.context:
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(HipsegError, match="no CUDA device"):
            resolve_device("cuda")


def test_train_writes_checkpoints_log_and_is_deterministic(tiny_synth, tmp_path):
    r1 = train(_smoke(), tiny_synth, tmp_path / "a", progress=False, log=lambda s: None)
    r2 = train(_smoke(), tiny_synth, tmp_path / "b", progress=False, log=lambda s: None)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history], "same seed, same losses"
    r3 = train(_smoke(seed=5), tiny_synth, tmp_path / "c", progress=False, log=lambda s: None)
    assert [h["loss"] for h in r3.history] != [h["loss"] for h in r1.history]
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} == {BEST_NAME, LAST_NAME, LOG_NAME}
    lines = [json.loads(text) for text in (out / LOG_NAME).read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2]
    assert lines == json.loads(json.dumps(r1.history)), "the log is the run's history, line for line"
    assert all(len(h["val_dice"]) == 6 for h in lines)
    ck = read_checkpoint(out / LAST_NAME)
    assert ck["epoch"] == 1 and ck["class_names"][5] == "prostate"
    assert ck["model_config"]["base_channels"] == 4 and ck["preprocessing"]["target_shape"] == [16, 16, 8]
    assert ck["library_version"] and "val_dice" in ck["metrics"]


def test_refuses_to_overwrite_and_resume_continues(tiny_synth, tmp_path):
    out = tmp_path / "run"
    # Stop after epoch 1 of 2 (time budget), as an interrupted run would.
    first = train(_smoke(epochs=2, max_minutes=1e-6), tiny_synth, out, progress=False, log=lambda s: None)
    assert len(first.history) == 1
    with pytest.raises(HipsegError, match="holds checkpoints of an earlier run"):
        train(_smoke(epochs=2), tiny_synth, out, progress=False, log=lambda s: None)
    r = train(_smoke(epochs=2), tiny_synth, out, resume=True, progress=False, log=lambda s: None)
    assert [h["epoch"] for h in r.history] == [1, 2]
    full = train(_smoke(epochs=2), tiny_synth, tmp_path / "straight", progress=False, log=lambda s: None)
    # fp32 on the CPU: the interrupted-and-resumed run is the uninterrupted one, to the last bit
    assert [h["loss"] for h in r.history] == [h["loss"] for h in full.history]
    a, b = (read_checkpoint(d / LAST_NAME)["model_state"] for d in (out, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in b), "the same weights"
    with pytest.raises(HipsegError, match="was trained with base_channels=4"):
        train(_smoke(epochs=3, base_channels=8), tiny_synth, out, resume=True, progress=False, log=lambda s: None)
    with pytest.raises(HipsegError, match="nothing to resume"):
        train(_smoke(), tiny_synth, tmp_path / "empty", resume=True, progress=False, log=lambda s: None)


def test_archive_previous_run_keeps_files(tiny_synth, tmp_path):
    out = tmp_path / "run"
    assert archive_previous_run(out) is None
    train(_smoke(epochs=1), tiny_synth, out, progress=False, log=lambda s: None)
    before = (out / BEST_NAME).read_bytes()
    moved = archive_previous_run(out)
    assert moved is not None and (moved / BEST_NAME).read_bytes() == before
    assert not (out / BEST_NAME).exists()


def test_gpu_path_features_run_on_cpu(tiny_synth, tmp_path, monkeypatch):
    """bf16 autocast, channels-last 3D, deep supervision and the torch.compile fallback train on the CPU."""
    calls = []

    def broken_compile(model, *a, **k):  # as when no compiler toolchain works: fails at the first call
        def run(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("backend compiler failed")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    quiet = dict(progress=False, log=lambda s: None)
    fp32 = train(_smoke(epochs=2, deep_supervision=True), tiny_synth, tmp_path / "f", **quiet)
    cfg = _smoke(epochs=2, amp="bf16", channels_last=True, compile=True, deep_supervision=True)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        bf16 = train(cfg, tiny_synth, tmp_path / "g", **quiet)
    assert calls == [1], "tried once, then fell back to eager"
    fp16 = train(_smoke(epochs=2, amp="fp16", deep_supervision=True), tiny_synth, tmp_path / "h", **quiet)
    # The same run in lower precision: the same losses up to rounding (measured: within 0.5 %).
    for other in (bf16, fp16):
        for a, b in zip(fp32.history, other.history):
            assert abs(a["loss"] - b["loss"]) < 0.03 * a["loss"], (a["loss"], b["loss"])
    plain = train(_smoke(epochs=2), tiny_synth, tmp_path / "p", **quiet)
    assert plain.history[0]["loss"] != fp32.history[0]["loss"], "deep supervision changes the run"


def test_early_stop_and_time_budget(tiny_synth, tmp_path):
    assert early_stop_reason([0.98, 0.9, 0.75, 0.71, 0.7, 0.72], 0, 0.7, 5).startswith("every class reached")
    assert early_stop_reason([0.98, 0.9, 0.75, 0.71, 0.69, 0.72], 0, 0.7, 5) == ""
    assert early_stop_reason([0.98, 0.9, np.nan, 0.8, 0.8, 0.8], 0, 0.7, 0) != "", "absent class ignored"
    assert early_stop_reason([0.5] * 6, 5, 0.7, 5).startswith("no better validation Dice for 5")
    assert early_stop_reason([0.5] * 6, 4, 0.7, 5) == ""
    # A learning rate too small to change any prediction: the second validation is no better.
    r = train(_smoke(epochs=5, lr=1e-12, early_stop_dice=0.0, patience=1), tiny_synth, tmp_path / "e",
              progress=False, log=lambda s: None)
    assert r.stopped_because == "no better validation Dice for 1 validations" and len(r.history) == 2
    r = train(_smoke(epochs=5, max_minutes=1e-6), tiny_synth, tmp_path / "t", progress=False, log=lambda s: None)
    assert "time limit" in r.stopped_because and len(r.history) == 1


def test_poly_schedule_warms_up_decays_to_zero_and_replans_without_a_jump():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = PolySchedule(opt, total_steps=12, warmup=2)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(12):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == [1.0, 2.0, 2.0], "linear warm-up to the base rate"
    np.testing.assert_allclose(lrs[3], 2.0 * (1 - 1 / 10) ** 0.9)
    assert all(a > b for a, b in zip(lrs[2:12], lrs[3:13])) and lrs[12] == 0.0, "decays to zero at the end"

    # Shortened after 5 of 12 steps to end 3 steps later: no jump, then zero exactly at the new end.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = PolySchedule(opt, total_steps=12, warmup=2)
    for _ in range(5):
        sched.step()
    before = opt.param_groups[0]["lr"]
    sched.replan(3)
    assert opt.param_groups[0]["lr"] == before
    after = []
    for _ in range(3):
        sched.step()
        after.append(opt.param_groups[0]["lr"])
    assert before > after[0] > after[1] > after[2] == 0.0
    state = sched.state_dict()
    other = PolySchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0), 12, 2)
    other.load_state_dict(state)
    assert other.factor() == sched.factor() == 0.0


def test_time_limited_epochs():
    assert time_limited_epochs([60, 60], math.inf, 2, 12) == 12
    assert time_limited_epochs([60, 60], 3600, 2, 12) == 12, "fits"
    assert time_limited_epochs([60, 60], 300, 2, 12) == 5
    assert time_limited_epochs([60, 60], 100, 2, 12) == 2, "never fewer than done"
    assert time_limited_epochs([300, 60, 60], 600, 3, 12) == 6, "a slow first epoch (one-off costs) is left out"


def test_time_limit_does_not_change_a_run_it_does_not_hit(tiny_synth, tmp_path):
    """Same seed, same losses whether or not a (generous) time limit is set: work defines the run."""
    a = train(_smoke(epochs=3, max_minutes=0), tiny_synth, tmp_path / "a", progress=False, log=lambda s: None)
    b = train(_smoke(epochs=3, max_minutes=600), tiny_synth, tmp_path / "b", progress=False, log=lambda s: None)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.stopped_because == b.stopped_because == "planned 3 epochs done"
    assert a.history[-1]["lr"] == 0.0, "the schedule ends at zero learning rate"


def test_a_run_cut_short_by_the_time_limit_still_ends_at_zero_lr(tiny_synth, tmp_path, monkeypatch):
    import hipseg_lib.train as T

    # As on a slow machine: after the first epoch, the budget is measured to fit 2 of 4 epochs.
    monkeypatch.setattr(T, "time_limited_epochs", lambda walls, budget, done, planned: min(planned, 2))
    msgs = []
    r = train(_smoke(epochs=4, max_minutes=5), tiny_synth, tmp_path / "cut", progress=False, log=msgs.append)
    assert len(r.history) == 2 and r.history[-1]["lr"] == 0.0
    assert r.stopped_because == "time limit of 5 minutes: training stopped after 2 of 4 planned epochs"
    warning = "WARNING: time limit of 5 min: at the speed measured so far this machine fits 2 of 4 epochs"
    assert any(m.startswith(warning) for m in msgs)
    assert read_checkpoint(tmp_path / "cut" / LAST_NAME)["stopped_because"] == r.stopped_because


@pytest.mark.parametrize("settings", [dict(data_on="device"), dict(data_on="host")])
def test_each_epoch_trains_on_fresh_augmentations(tiny_synth, tmp_path, monkeypatch, settings):
    """What the network is fed in epoch 2 is not epoch 1's batches again. (The earlier loader, with
    `num_workers=2` and persistent workers, failed this: every input of epoch 2 equalled one of
    epoch 1, since each worker kept its own dataset copy at epoch 0.)"""
    import hipseg_lib.train as T

    seen: list[torch.Tensor] = []

    class Recording(T.CompiledOrEager):
        def __call__(self, x):
            if self.net.training:
                seen.extend(v.clone() for v in x)
            return super().__call__(x)

    monkeypatch.setattr(T, "CompiledOrEager", Recording)
    r = train(_smoke(epochs=2, **settings), tiny_synth, tmp_path / "r", progress=False, log=lambda s: None)
    n = r.history[0]["steps"] * 2
    first, second = seen[:n], seen[n:]
    assert len(first) == len(second) == n > 4
    repeated = sum(any(torch.equal(x, y) for y in first) for x in second)
    assert repeated <= n // 3, f"{repeated} of {n} inputs of epoch 2 repeat epoch 1"


def test_the_loss_weights_reach_the_loss(tiny_synth, tmp_path, monkeypatch):
    """``--set dice_weight=0`` (chapter 4's first exercise) trains on cross-entropy alone."""
    import hipseg_lib.train as T

    seen = []
    real = T.DiceCELoss

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "DiceCELoss", spy)
    base = train(_smoke(epochs=1), tiny_synth, tmp_path / "a", progress=False, log=lambda s: None)
    ce = train(_smoke(epochs=1, dice_weight=0.0), tiny_synth, tmp_path / "b", progress=False, log=lambda s: None)
    assert seen == [{"dice_weight": 1.0, "ce_weight": 1.0}, {"dice_weight": 0.0, "ce_weight": 1.0}]
    assert ce.history[0]["loss"] < base.history[0]["loss"], "no Dice term: the loss lacks its (1 - Dice) part"
