"""The torch.compile guard, and the one precision vocabulary."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from hipseg_lib.distributed import CompiledOrEager


class _BackwardFails(torch.autograd.Function):
    """Identity forward; a backward that fails as a lazily compiled backward graph can."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("inductor: backward compilation failed")


def _compile_to(monkeypatch, fn):
    monkeypatch.setattr(torch, "compile", lambda module: fn)


def test_a_backward_that_fails_to_compile_falls_back_to_eager_and_leaves_no_gradients(monkeypatch):
    net = nn.Linear(2, 2)
    _compile_to(monkeypatch, lambda x: _BackwardFails.apply(net(x)))
    guarded = CompiledOrEager(net)
    x = torch.randn(3, 2)
    with pytest.warns(UserWarning, match="torch.compile failed .*backward compilation failed"):
        out = guarded(x)
    assert guarded.compiled is None and torch.allclose(out, net(x))
    assert all(p.grad is None for p in net.parameters()), "the warm-up leaves no gradients"
    out.sum().backward()  # the eager network trains on
    assert net.weight.grad is not None


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   torch.AcceleratorError("CUDA error: an illegal memory access was encountered")])
def test_memory_and_cuda_errors_are_raised_not_taken_for_a_compile_failure(monkeypatch, error):
    def broken(x):
        raise error

    _compile_to(monkeypatch, broken)
    with pytest.raises(type(error), match="CUDA"):
        CompiledOrEager(nn.Linear(2, 2))(torch.randn(3, 2))


def test_the_warm_up_puts_back_the_random_numbers_it_drew(monkeypatch):
    """A compiled run with dropout draws what an eager run draws: the warm-up's draws are undone."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    _compile_to(monkeypatch, lambda x: net(x))
    guarded = CompiledOrEager(net)
    torch.manual_seed(0)
    compiled = guarded(torch.ones(2, 4))
    torch.manual_seed(0)
    assert torch.equal(compiled, net(torch.ones(2, 4)))


def test_every_process_takes_the_same_road(monkeypatch):
    """Compiling worked here, but another process reports a failure: this one runs eager too."""
    net = nn.Linear(2, 2)
    calls = []
    _compile_to(monkeypatch, lambda x: calls.append(1) or net(x))
    votes = []
    guarded = CompiledOrEager(net, agree=lambda ok: votes.append(ok) or 0)
    guarded(torch.randn(3, 2))
    guarded(torch.randn(3, 2))
    assert votes == [1] and guarded.compiled is None and calls == [1], "asked once, then eager"


def test_one_precision_vocabulary_for_training_and_prediction():
    from hipseg_lib import SettingsError
    from hipseg_lib.runtime import cpu_has_bf16, precision_name, resolve_device, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") is None and precision_name(None) == "fp32"
    assert resolve_precision(cpu, "bf16") == torch.bfloat16
    assert precision_name(resolve_precision(cpu, "auto")) == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(SettingsError, match="precision must be one of auto, bf16, fp16, fp32, got 'off'"):
        resolve_precision(cpu, "off")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("built_with, gpus, why", [
    (None, 0, "this torch build has no CUDA"),
    ("13.0", 0, "no CUDA GPU is visible"),
    ("13.0", 1, "a driver older than this torch build's CUDA 13.0"),
])
def test_a_cuda_device_that_cannot_be_used_is_refused_with_the_reason(monkeypatch, built_with, gpus, why):
    from hipseg_lib import HipsegError
    from hipseg_lib.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", built_with)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(HipsegError, match=f"device 'cuda:1' asked for, but .*{re.escape(why)}"):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("flags, cap, native", [
    ({"avx512f", "avx512_vnni"}, None, False),            # Cascade Lake: oneDNN emulates bf16
    ({"avx512f", "avx512_bf16", "amx_bf16"}, None, True),  # Sapphire Rapids
    ({"avx512f", "avx512_bf16"}, "AVX512_CORE_VNNI", False),  # capped below bf16
    ({"avx512f", "avx512_bf16"}, "avx512_core_bf16", True),
    ({"avx2", "fma"}, None, False),
])
def test_auto_means_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, flags, cap, native):
    """oneDNN says it "supports" bf16 on any AVX-512 CPU, emulated on the older ones, where it is
    no faster and once turned a network's loss into NaN: auto picks fp32 there."""
    from hipseg_lib import runtime

    monkeypatch.setattr(runtime, "_onednn_runs_bf16", lambda: True)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert runtime.cpu_has_bf16() is native
    want = torch.bfloat16 if native else None
    assert runtime.resolve_precision(torch.device("cpu"), "auto") is want


def test_this_cpus_flags_are_read():
    """The flags come from the machine itself (every x86 CPU has sse2)."""
    import platform

    from hipseg_lib.runtime import _cpu_flags
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in _cpu_flags()
