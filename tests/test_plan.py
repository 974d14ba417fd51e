"""Planning the full preset on the CPU: FLOPs, the time they take at the assumed MFU, and memory."""
from __future__ import annotations

import pytest
import torch

from hipseg_lib.config import make_config
from hipseg_lib.model import ModelConfig, ResUNet3D, activation_bytes, saved_tensor_bytes
from hipseg_lib.plan import BF16_PEAK_TFLOPS, PLANNING_MFU, forward_flops, peak_tflops, plan_run, step_flops


def test_full_preset_is_planned_at_about_twenty_minutes_on_an_h100():
    cfg = make_config("full")
    assert cfg.early_stop_dice == 0 and cfg.patience == 0, "a fixed schedule, the best checkpoint kept"
    plan = plan_run(cfg)
    assert 18 <= plan["minutes"] <= 22, plan
    assert plan["steps_per_epoch"] == 169 // 2 and plan["mfu"] == PLANNING_MFU == 0.10
    assert abs(plan["step_tflop"] - 2.4) < 0.05, "the step the issue counted: 2.4 TFLOP"
    assert 70 < plan["volumes_per_s"] < 95
    half = plan_run(cfg, mfu=0.05)
    assert half["minutes"] == pytest.approx(2 * plan["minutes"], rel=1e-6), "time scales with 1 / MFU"
    two = plan_run(cfg, world=2)
    assert two["minutes"] < 0.55 * plan["minutes"]
    assert any("20." in line or "21." in line or "19." in line for line in plan.lines())
    with pytest.raises(ValueError, match="mfu"):
        plan_run(cfg, mfu=0)


def test_flop_counts_are_pytorchs_and_scale_with_the_batch():
    cfg = make_config("smoke", target_shape=(16, 16, 8), base_channels=4, depth=3, batch_size=1)
    one = step_flops(cfg)
    assert step_flops(cfg.replace(batch_size=3)) == pytest.approx(3 * one, rel=1e-9)
    fwd = forward_flops(cfg)
    assert 0.25 * one < fwd < 0.5 * one, "backward costs about twice the forward pass"
    # the same count on a real (CPU) model and input
    from torch.utils.flop_counter import FlopCounterMode

    model = ResUNet3D(cfg.model)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, 16, 16, 8)).float().sum().backward()
    assert counter.get_total_flops() == one
    assert peak_tflops("NVIDIA H200") == BF16_PEAK_TFLOPS["H200"] == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("Tesla T4") == 65.0
    assert peak_tflops("Some Future Card") is None


def test_full_preset_fits_a_24_gb_card_in_bf16():
    """Tensors autograd saves for backward, counted by PyTorch, against the activation estimate."""
    full = make_config("full")
    shape, batch = full.preprocessing.target_shape, full.batch_size
    saved = saved_tensor_bytes(full.model, shape, batch, torch.bfloat16)
    estimate = activation_bytes(full.model, shape, batch, bytes_per_value=2)
    assert saved < 20 * 2**30 and estimate < 20 * 2**30
    assert 0.5 < saved / estimate < 1.5, (saved / 2**30, estimate / 2**30)
    small = ModelConfig(base_channels=4, depth=3)
    assert saved_tensor_bytes(small, (16, 16, 8), 2) == 2 * saved_tensor_bytes(small, (16, 16, 8), 1)
    assert saved_tensor_bytes(small, (16, 16, 8), 1, torch.float32) == pytest.approx(
        2 * saved_tensor_bytes(small, (16, 16, 8), 1), rel=0.01), "bf16 halves it"


def test_saved_tensor_bytes_match_a_real_forward_pass():
    """On the CPU with real tensors, the meta count is what autograd keeps, within the few tensors
    that hipseg's CPU kernels (model.Conv3d) save in another form."""
    cfg = ModelConfig(base_channels=4, depth=3)
    model = ResUNet3D(cfg).train()
    seen, weights = {}, {id(p) for p in model.parameters()}

    def pack(t):
        if id(t) not in weights:
            seen[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(2, 1, 16, 16, 8))
    real = sum(t.numel() * t.element_size() for t in seen.values())
    assert 0.9 < real / saved_tensor_bytes(cfg, (16, 16, 8), 2, torch.float32) < 1.1
