"""Planning a run on the CPU: FLOPs counted by PyTorch, the time they take at an assumed MFU, and
the memory autograd keeps."""
from __future__ import annotations

import pytest
import torch

from hipseg_lib.config import make_config
from hipseg_lib.model import ModelConfig, ResUNet3D
from hipseg_lib.plan import forward_flops, peak_tflops, plan_run, saved_tensor_bytes, step_flops


def test_a_plan_is_flops_over_throughput():
    cfg = make_config("full")
    plan = plan_run(cfg, train_volumes=100, val_volumes=10, mfu=0.1, peak=1000.0)
    steps = 100 // cfg.batch_size
    validations = cfg.epochs // cfg.val_every
    expected = (cfg.epochs * steps * step_flops(cfg) + validations * 10 * forward_flops(cfg)) / (0.1 * 1000e12)
    assert plan["minutes"] == pytest.approx(expected / 60, rel=1e-9)
    assert plan_run(cfg, mfu=0.05)["minutes"] == pytest.approx(2 * plan_run(cfg, mfu=0.1)["minutes"], rel=1e-9)
    assert plan_run(cfg, world=2)["minutes"] < 0.55 * plan_run(cfg)["minutes"], "two GPUs: half the steps each"
    assert len(plan.lines()) == 3
    with pytest.raises(ValueError, match="mfu"):
        plan_run(cfg, mfu=0)


def test_flop_counts_are_pytorchs_and_scale_with_the_batch():
    cfg = make_config("smoke", target_shape=(16, 16, 8), base_channels=4, depth=3, batch_size=1)
    one = step_flops(cfg)
    assert step_flops(cfg.replace(batch_size=3)) == pytest.approx(3 * one, rel=1e-9)
    assert 0.25 * one < forward_flops(cfg) < 0.5 * one, "backward costs about twice the forward pass"
    from torch.utils.flop_counter import FlopCounterMode

    model = ResUNet3D(cfg.model).train()
    with FlopCounterMode(display=False) as counter:
        sum(o.float().sum() for o in model(torch.zeros(1, 1, 16, 16, 8))).backward()
    assert counter.get_total_flops() == one, "the same count on a real model and input"
    assert peak_tflops("NVIDIA H200") == peak_tflops("H200")
    assert peak_tflops("NVIDIA H100 PCIe") < peak_tflops("NVIDIA H100 80GB HBM3"), "the longest name matches"
    assert peak_tflops("Some Future Card") is None


def test_the_full_preset_fits_a_24_gb_card_in_bf16_and_memory_scales():
    full = make_config("full")
    saved = saved_tensor_bytes(full.model, full.preprocessing.target_shape, full.batch_size, torch.bfloat16)
    assert saved < 20 * 2**30, saved / 2**30
    small = ModelConfig(base_channels=4, depth=3)
    assert saved_tensor_bytes(small, (16, 16, 8), 2) == 2 * saved_tensor_bytes(small, (16, 16, 8), 1)
    assert saved_tensor_bytes(small, (16, 16, 8), 1, torch.float32) == pytest.approx(
        2 * saved_tensor_bytes(small, (16, 16, 8), 1), rel=0.05), "bf16 about halves it (pooling's indices: int64)"


def test_saved_tensor_bytes_match_a_real_forward_pass():
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
    assert real == saved_tensor_bytes(cfg, (16, 16, 8), 2, torch.float32)
