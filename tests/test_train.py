"""The core training functions the training chapter shows and runs: the step, the schedule, one
epoch, validation and fit()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hipseg_lib import BEST_NAME, LAST_NAME
from hipseg_lib.checkpoint import read_checkpoint
from hipseg_lib.config import make_config
from hipseg_lib.loss import DiceCELoss
from hipseg_lib.train import NonFiniteLoss, PolySchedule, fit, make_loss, prepare_data, training_step

CPU = torch.device("cpu")


def smoke(**kw):
    return make_config("smoke", **{**dict(epochs=2, target_shape=(16, 16, 8), base_channels=4, depth=3), **kw})


@pytest.fixture(scope="module")
def tiny_data(tiny_synth, tmp_path_factory):
    return prepare_data(smoke(), tiny_synth, tmp_path_factory.mktemp("cache"), CPU)


def _net_and_batch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1))
    x, y = torch.randn(2, 1, 4, 4, 4), torch.randint(0, 3, (2, 4, 4, 4))
    return net, x, y


@pytest.mark.parametrize("clip", [0.0, 0.05, 5.0])
def test_training_step_is_forward_loss_backward_clip_update(clip):
    """The step by hand, with and without clipping (at grad_clip=0 nothing is clipped)."""
    net, x, y = _net_and_batch()
    mine = [p.detach().clone() for p in net.parameters()]
    loss_fn = DiceCELoss(3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = training_step(net, loss_fn, opt, x, y, grad_clip=clip)
    ref_net, _, _ = _net_and_batch()
    ref = loss_fn(ref_net(x), y)
    ref.backward()
    grads = [p.grad for p in ref_net.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    scale = min(1.0, clip / (float(norm) + 1e-6)) if clip > 0 else 1.0
    assert torch.allclose(loss, ref.detach())
    for p, before, g in zip(net.parameters(), mine, grads):
        assert torch.allclose(p, before - 0.1 * scale * g, atol=1e-6)


def test_training_step_forgets_the_previous_gradients():
    net, x, y = _net_and_batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    training_step(net, DiceCELoss(3), opt, x, y)
    first = [p.grad.clone() for p in net.parameters()]
    training_step(net, DiceCELoss(3), opt, x, y)
    assert all(torch.equal(a, p.grad) for a, p in zip(first, net.parameters())), "not the sum of two"


def test_training_step_in_bf16_and_fp16_with_its_scaler():
    net, x, y = _net_and_batch()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    a = training_step(net, DiceCELoss(3), opt, x, y, dtype=torch.bfloat16)
    assert a.dtype == torch.float32 and torch.isfinite(a)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    b = training_step(net, DiceCELoss(3), opt, x, y, dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(b) and abs(float(b) - float(a)) < 0.5, "the loss, not the scaled loss"


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
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = PolySchedule(opt, total_steps=12, warmup=2)
    for _ in range(5):
        sched.step()
    before = opt.param_groups[0]["lr"]
    sched.replan(3)
    assert opt.param_groups[0]["lr"] == before, "no jump"
    after = []
    for _ in range(3):
        sched.step()
        after.append(opt.param_groups[0]["lr"])
    assert before > after[0] > after[1] > after[2] == 0.0
    other = PolySchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0), 12, 2)
    other.load_state_dict(sched.state_dict())
    assert other.factor() == sched.factor() == 0.0


def test_make_loss_puts_a_loss_on_every_head_with_the_configured_weights():
    loss = make_loss(smoke(dice_weight=0.0))
    assert len(loss.weights) == 2 and loss.loss.dice_weight == 0.0 and loss.loss.ce_weight == 1.0
    assert len(make_loss(smoke(deep_supervision=False)).weights) == 1


def test_fit_writes_the_best_and_the_last_checkpoint_and_repeats_itself(tiny_data, tmp_path):
    a = fit(smoke(), tiny_data, tmp_path / "a", CPU, "fp32", log=lambda s: None)
    b = fit(smoke(), tiny_data, tmp_path / "b", CPU, "fp32", log=lambda s: None)
    assert [h["loss"] for h in a] == [h["loss"] for h in b], "same seed, same run"
    assert [h["epoch"] for h in a] == [1, 2] and a[-1]["lr"] == 0.0
    assert all(len(h["val_dice"]) == 6 and h["val_loss"] > 0 for h in a)
    best = read_checkpoint(tmp_path / "a" / BEST_NAME)
    scores = [np.nanmean(h["val_dice"][1:]) for h in a]
    assert best["epoch"] == int(np.argmax(scores)), "the best epoch by mean foreground Dice"
    last = read_checkpoint(tmp_path / "a" / LAST_NAME)
    assert last["epoch"] == 1 and last["inference"]["mirror_axes"] == [0]
    assert last["train_config"]["model"]["base_channels"] == 4
    c = fit(smoke(seed=5), tiny_data, tmp_path / "c", CPU, "fp32", log=lambda s: None)
    assert [h["loss"] for h in c] != [h["loss"] for h in a]


def test_fit_stops_at_a_nonfinite_loss(tiny_data, tmp_path):
    with pytest.raises(NonFiniteLoss, match="the loss became .* in epoch 1"):
        fit(smoke(lr=1e30), tiny_data, tmp_path / "x", CPU, "fp32", log=lambda s: None)


def test_fit_follows_the_seed_projects_stopping_rule(tiny_data, tmp_path, monkeypatch):
    import hipseg_lib.train as T

    missed = fit(smoke(epochs=3, early_stop_dice=0.7), tiny_data, tmp_path / "a", CPU, "fp32", log=lambda s: None)
    assert len(missed) == 3, "a class below 0.7: no stop"
    real = T.validate

    def every_class_at_0_8(predictor, volumes, loss_fn, device):
        dice, losses = real(predictor, volumes, loss_fn)
        return np.full_like(dice, 0.8), losses

    monkeypatch.setattr(T, "validate", every_class_at_0_8)
    history = fit(smoke(epochs=3, early_stop_dice=0.7), tiny_data, tmp_path / "s", CPU, "fp32", log=lambda s: None)
    assert len(history) == 1 and read_checkpoint(tmp_path / "s" / LAST_NAME)["epoch"] == 0


def test_batches_are_fresh_every_epoch(tiny_data):
    """What the network is fed in epoch 2 is not epoch 1's batches again."""
    first = [x for x, _ in tiny_data.batches.epoch(0)]
    second = [x for x, _ in tiny_data.batches.epoch(1)]
    again = [x for x, _ in tiny_data.batches.epoch(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "an epoch repeats itself"
    repeated = sum(any(torch.equal(x, y) for y in first) for x in second)
    assert repeated <= len(second) // 3


def test_the_early_stop_rule_reads_the_organs_not_the_background():
    from hipseg_lib.train import reached_early_stop

    cfg = smoke(early_stop_dice=0.7)
    assert reached_early_stop(cfg, [0.2, 0.9, 0.8, 0.75, 0.71, 0.7]), "a low background does not hold it back"
    assert not reached_early_stop(cfg, [1.0, 0.9, 0.8, 0.75, 0.71, 0.69])
    assert reached_early_stop(cfg, [1.0, 0.9, None, 0.75, float("nan"), 0.7]), "a class no volume has is left out"
    assert not reached_early_stop(smoke(), [1.0] * 6), "0: off"


def test_a_run_in_fp32_on_a_cpu_lies_channels_last_and_bf16_as_pytorch_lays_it():
    """start_run's memory layout: channels-last 3D for fp32 on a CPU (oneDNN for every convolution),
    PyTorch's default layout for bf16."""
    from hipseg_lib.train import start_run

    def conv_weight(run):
        return next(p for p in run.network.parameters() if p.dim() == 5 and p.shape[1] > 1)

    fp32 = start_run(smoke(), 4, CPU, "fp32")
    assert fp32.layout == torch.channels_last_3d and fp32.dtype is None
    w = conv_weight(fp32)
    assert w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
    bf16 = start_run(smoke(), 4, CPU, "bf16")
    assert bf16.layout == torch.contiguous_format and conv_weight(bf16).is_contiguous()
    assert fp32.schedule.warmup == bf16.schedule.warmup and fp32.scaler is None


def test_the_best_record_skips_epochs_without_validation():
    """With val_every > 1 most records have no val_dice: the best is chosen among the others (the
    benchmarks' and the GPU check's rule, and fit's), the first on a tie."""
    import math

    from hipseg_lib.train import best_record

    history = [{"epoch": 1}, {"epoch": 2, "val_dice": [1.0, 0.5, 0.6]}, {"epoch": 3},
               {"epoch": 4, "val_dice": [0.0, 0.7, math.nan]}, {"epoch": 5, "val_dice": [1.0, 0.7, 0.7]}]
    assert best_record(history)["epoch"] == 4, "mean foreground 0.7 (NaN aside), the first of two"
    with pytest.raises(ValueError, match="no epoch of this history was validated"):
        best_record(history[:1])


@pytest.mark.parametrize("taken", [2, 6, 10])  # in the warm-up, in the decay, at the end
def test_rebase_follows_the_new_plan_from_the_step_reached(taken):
    def lrs(schedule, n):
        out = []
        for _ in range(n):
            out.append(schedule.optimizer.param_groups[0]["lr"])
            schedule.step()
        return out

    def schedule(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return PolySchedule(opt, total, warmup=4)

    short, planned = schedule(10), schedule(20)
    lrs(short, taken)
    lrs(planned, taken)
    short.rebase(20)
    assert lrs(short, 20 - taken) == pytest.approx(lrs(planned, 20 - taken))
