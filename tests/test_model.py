from __future__ import annotations

import pytest
import torch
from torch import nn

from hipseg_lib.cpu_kernels import CPUConv3d, use_cpu_kernels, use_torch_kernels
from hipseg_lib.loss import DiceCELoss
from hipseg_lib.model import ConvBlock, ModelConfig, ResidualBlock, ResUNet3D, count_parameters, layer_table


@pytest.mark.parametrize("depth, shape", [(2, (8, 8, 4)), (3, (16, 16, 8)), (4, (32, 16, 8))])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_output_shape(depth, shape, deep_supervision):
    net = ResUNet3D(ModelConfig(base_channels=4, depth=depth, deep_supervision=deep_supervision))
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 6, *shape)


def test_residual_block_shortcut_and_dropout():
    blk = ResidualBlock(4, 8, dropout=0.5)
    assert isinstance(blk.shortcut, torch.nn.Conv3d)
    assert ResidualBlock(4, 4).shortcut.__class__.__name__ == "Identity"
    x = torch.randn(1, 4, 8, 8, 8)
    blk.train()
    assert not torch.equal(blk(x), blk(x)), "dropout is active in training"
    blk.eval()
    assert torch.equal(blk(x), blk(x)), "and off in evaluation"
    # The output is the convolution path plus the 1x1x1 shortcut.
    path = blk.conv2(blk.act2(blk.norm2(blk.conv1(blk.act1(blk.norm1(x))))))
    assert torch.allclose(blk(x), path + blk.shortcut(x), atol=1e-6)


def test_indivisible_input_is_a_clear_error():
    net = ResUNet3D(ModelConfig(base_channels=4, depth=3))
    with pytest.raises(ValueError, match=r"spatial size \(16, 16, 6\) is not divisible by 4"):
        net(torch.zeros(1, 1, 16, 16, 6))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.zeros(1, 2, 16, 16, 8))


def test_bad_configs():
    with pytest.raises(ValueError, match="depth"):
        ResUNet3D(depth=1)
    with pytest.raises(ValueError, match="dropout"):
        ResUNet3D(dropout=1.5)
    with pytest.raises(ValueError, match="either"):
        ResUNet3D(ModelConfig(), depth=3)


def test_width_and_depth_change_parameters_and_table():
    small = ResUNet3D(ModelConfig(base_channels=4, depth=3))
    wide = ResUNet3D(ModelConfig(base_channels=8, depth=3))
    deep = ResUNet3D(ModelConfig(base_channels=4, depth=4))
    assert count_parameters(small) < count_parameters(wide)
    assert count_parameters(small) < count_parameters(deep)
    small.train()
    rows = layer_table(small, (16, 16, 8))
    assert small.training, "layer_table hands the model back in the mode it had"
    small.eval()
    layer_table(small, (16, 16, 8))
    assert not small.training
    assert [r["layer"] for r in rows][:2] == ["stem", "encoder.0"]
    assert rows[-1]["output shape"] == (6, 16, 16, 8)
    assert rows[[r["layer"] for r in rows].index("bottleneck")]["output shape"] == (16, 4, 4, 2)
    # All parameters are accounted for by the stages listed.
    assert sum(r["parameters"] for r in rows) + count_parameters(small.final_norm) == count_parameters(small)


@pytest.mark.parametrize("design", [dict(), dict(light_levels=2, top_kernel=0), dict(light_levels=2, top_kernel=1),
                                    dict(downsample="maxpool", light_levels=0)])
def test_overfits_one_small_volume(design):
    """The network (the default design, the cpu preset's lighter one and the seed's) drives the
    loss well down on one volume (CPU, seconds)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16, 8)
    y = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    y[:, 2:14, 2:14, :] = 1
    y[:, 4:8, 4:8, 2:6] = 2
    y[:, 9:13, 5:9, 1:5] = 3
    y[:, 8:11, 10:13, 2:5] = 4
    y[:, 5:7, 10:12, 3:5] = 5
    x = x * 0.3 + y.float()[:, None] * 0.5  # learnable but noisy
    net = ResUNet3D(ModelConfig(base_channels=8, depth=3, **design))
    loss_fn = DiceCELoss(6)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = loss_fn(net(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    assert (net(x).argmax(1) == y).float().mean() > 0.95


def test_config_round_trip_keeps_every_setting():
    cfg = ModelConfig(base_channels=12, depth=5, downsample="maxpool", light_levels=0, top_kernel=3)
    assert set(cfg.to_dict()) == {f.name for f in __import__("dataclasses").fields(ModelConfig)}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="downsample"):
        ModelConfig(downsample="avgpool")


def test_deep_supervision_adds_the_coarse_outputs_to_the_final_one():
    torch.manual_seed(0)
    net = ResUNet3D(ModelConfig(base_channels=4, depth=4, deep_supervision=True))
    x = torch.randn(1, 1, 16, 16, 8)
    net(x).sum().backward()
    assert len(net.aux_heads) == 2
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.aux_heads), \
        "every segmentation layer feeds the output"
    with torch.no_grad():
        full = net(x)
        for h in net.aux_heads:
            torch.nn.init.zeros_(h.weight), torch.nn.init.zeros_(h.bias)
        assert not torch.allclose(full, net(x)), "without them the output changes"


def test_light_levels_replace_the_finest_residual_blocks():
    c = ModelConfig(base_channels=4, depth=4, light_levels=2, top_kernel=1)
    net = ResUNet3D(c)
    assert isinstance(net.encoder[0], torch.nn.Identity) and isinstance(net.encoder[1], ConvBlock)
    assert isinstance(net.encoder[2], ResidualBlock)
    assert [type(u.block).__name__ for u in net.decoder] == ["ResidualBlock", "ConvBlock", "ConvBlock"]
    assert net.decoder[-1].block.conv.kernel_size == (1, 1, 1)
    assert net.decoder[-2].block.conv.kernel_size == (3, 3, 3)
    assert net(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 6, 16, 16, 8)
    for bad in (dict(light_levels=4), dict(top_kernel=2), dict(top_kernel=0, light_levels=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig(depth=4, **bad)


def test_without_a_top_convolution_the_head_reads_the_concatenation():
    """top_kernel=0: no decoder convolution at full resolution; the final norm and the 1x1x1 head
    take the upsampled features and the skip side by side (twice base_channels)."""
    net = ResUNet3D(ModelConfig(base_channels=4, depth=4, light_levels=2, top_kernel=0))
    assert isinstance(net.decoder[-1].block, torch.nn.Identity)
    assert net.head.in_channels == 8 and net.final_norm[0].num_features == 8
    x = torch.randn(1, 1, 16, 16, 8)
    up = net.decoder[-1]
    seen = {}
    up.register_forward_hook(lambda m, i, o: seen.update(out=o, skip=i[1]))
    assert net(x).shape == (1, 6, 16, 16, 8)
    assert torch.equal(seen["out"][:, 4:], seen["skip"]), "the skip goes to the head unchanged"
    assert count_parameters(net) < count_parameters(ResUNet3D(ModelConfig(base_channels=4, depth=4, light_levels=2,
                                                                          top_kernel=1)))


def _same_as_nn_conv(conv: CPUConv3d, x: torch.Tensor) -> None:
    """Output, input gradient and weight gradient of hipseg's CPUConv3d are nn.Conv3d's."""
    ref = torch.nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=conv.bias is not None)
    ref.load_state_dict(conv.state_dict())  # the same parameters, the same checkpoint keys
    grads = []
    for layer in (ref, conv):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads.append((y.detach(), xi.grad, layer.weight.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_conv3d_computes_what_nn_conv3d_does(batch):
    torch.manual_seed(0)
    _same_as_nn_conv(CPUConv3d(8, 3, 1), torch.randn(batch, 8, 6, 4, 5))  # 1x1x1 with a bias: matrix products
    _same_as_nn_conv(CPUConv3d(16, 16, 3, padding=1, bias=False), torch.randn(batch, 16, 8, 8, 6))
    _same_as_nn_conv(CPUConv3d(4, 8, 3, stride=2, padding=1, bias=False), torch.randn(batch, 4, 8, 8, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype is nn.Conv3d's under autocast too
        assert CPUConv3d(8, 3, 1)(torch.randn(batch, 8, 4, 4, 4)).dtype == torch.bfloat16


def _kernels(layer: torch.nn.Module, x: torch.Tensor) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x.clone().requires_grad_()).sum().backward()
    return {e.key for e in prof.key_averages()}


def test_cpu_conv3d_keeps_a_single_fp32_volume_in_onednn_and_does_1x1x1_as_products():
    x = torch.randn(1, 48, 16, 16, 12)  # a deep level of the cpu preset: 48 * 16 * 16 <= 20480
    plain = torch.nn.Conv3d(48, 48, 3, padding=1, bias=False)
    ours = CPUConv3d(48, 48, 3, padding=1, bias=False)
    # PyTorch's own rule sends this to its native kernel (what CPUConv3d exists to avoid) ...
    assert "aten::slow_conv3d_forward" in _kernels(plain, x)
    kernels = _kernels(ours, x)
    assert "aten::slow_conv3d_forward" not in kernels and "aten::mkldnn_convolution" in kernels
    # ... and a batch of two to oneDNN already.
    assert "aten::mkldnn_convolution" in _kernels(plain, torch.randn(2, 48, 16, 16, 12))
    # The threshold hipseg copies from PyTorch (cpu_kernels._NATIVE_BELOW), at its edge: N*C*D*H = 20480
    # still goes native (and hipseg moves it), one more row of H goes to oneDNN by itself.
    edge, past = torch.randn(1, 40, 16, 32, 4), torch.randn(1, 40, 16, 33, 4)
    plain, ours = torch.nn.Conv3d(40, 8, 3, padding=1), CPUConv3d(40, 8, 3, padding=1)
    assert "aten::slow_conv3d_forward" in _kernels(plain, edge)
    assert "aten::slow_conv3d_forward" not in _kernels(plain, past)
    assert "aten::slow_conv3d_forward" not in _kernels(ours, edge)
    head = _kernels(CPUConv3d(24, 6, 1), torch.randn(1, 24, 16, 16, 12))
    assert "aten::mm" in head and not any("convolution" in k for k in head)


@pytest.mark.parametrize("config", [ModelConfig(base_channels=4, depth=3),
                                    ModelConfig(base_channels=4, depth=4, deep_supervision=True, light_levels=2,
                                                top_kernel=0),
                                    ModelConfig(base_channels=4, depth=3, downsample="maxpool", light_levels=0)])
def test_cpu_kernels_swapped_into_a_network_change_no_result(config):
    """The network is written with plain nn.Conv3d; use_cpu_kernels swaps CPUConv3d into every one of
    them, and the network then gives the same outputs and gradients (and back again)."""
    torch.manual_seed(0)
    plain = ResUNet3D(config)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is nn.Conv3d for m in convs), "the definition uses torch.nn.Conv3d"
    fast = ResUNet3D(config)
    fast.load_state_dict(plain.state_dict())
    assert use_cpu_kernels(fast) is fast
    assert all(type(m) is CPUConv3d for m in fast.modules() if isinstance(m, nn.Conv3d))
    assert list(fast.state_dict()) == list(plain.state_dict()), "the same checkpoint keys"
    x = torch.randn(1, 1, 16, 16, 8)
    grads = []
    for net in (plain, fast):
        xi = x.clone().requires_grad_()
        y = net(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads.append([y.detach(), xi.grad, torch.cat([p.grad.ravel() for p in net.parameters()])])
    for a, b in zip(*grads):  # (a gradient that is zero but for rounding is judged on the scale of all)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    use_torch_kernels(fast)
    assert all(type(m) is nn.Conv3d for m in fast.modules() if isinstance(m, nn.Conv3d))


def test_training_and_prediction_run_the_cpu_kernels(tiny_synth, tmp_path):
    """A fp32 training run on the CPU computes its convolutions with CPUConv3d's kernels, and a
    checkpoint loaded on the CPU predicts with them."""
    from torch.profiler import ProfilerActivity, profile

    from hipseg_lib.checkpoint import load_model
    from hipseg_lib.config import make_config
    from hipseg_lib.train import train

    cfg = make_config("smoke", target_shape=(16, 16, 8), base_channels=4, depth=3, epochs=1, batch_size=1,
                      amp="off", device="cpu", augment=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = train(cfg, tiny_synth, tmp_path / "run", progress=False, log=lambda s: None)
    kernels = {e.key for e in prof.key_averages()}
    # the 1x1x1 head as matrix products (nothing else in a step multiplies matrices), the
    # single-volume 3x3x3 convolutions in oneDNN
    assert "aten::mm" in kernels and "aten::mkldnn_convolution" in kernels
    net = load_model(result.best_path, "cpu").network
    assert all(type(m) is CPUConv3d for m in net.modules() if isinstance(m, nn.Conv3d))


def test_a_checkpoint_of_the_seeds_design_predicts(tmp_path):
    """A checkpoint of the seed's design (max pooling, residual blocks at full resolution) loads and
    segments a scan with the labels its own network gives; a pre-release (v1) checkpoint is refused
    with one line that says what to do."""
    import numpy as np

    from hipseg_lib.checkpoint import load_model, save_checkpoint
    from hipseg_lib.predict import TorchBackend, load_predictor
    from hipseg_lib.predictor import InferenceSettings, Predictor
    from hipseg_lib.preprocess import Preprocessing

    old = {"in_channels": 1, "num_classes": 6, "base_channels": 4, "depth": 3, "dropout": 0.0,
           "deep_supervision": False}
    torch.manual_seed(0)
    seed_design = ResUNet3D(ModelConfig(**old, downsample="maxpool", light_levels=0)).eval()
    prep = Preprocessing(target_shape=(16, 16, 8))
    path = save_checkpoint(tmp_path / "seed.pth", seed_design, seed_design.config, prep)
    model = load_model(path).network
    assert model.config.downsample == "maxpool" and model.config.light_levels == 0
    image = np.random.default_rng(0).normal(100, 20, (20, 18, 10)).astype(np.float32)
    plain = InferenceSettings(tta=False)
    got = load_predictor(path, "cpu", plain).labels(image, np.eye(4))
    want = Predictor(TorchBackend(seed_design), prep, plain).labels(image, np.eye(4))
    assert got.shape == image.shape and np.array_equal(got, want)
    from hipseg_lib import HipsegError

    ck = torch.load(path, weights_only=True)
    ck["format"] = "hipseg-checkpoint-v1"
    torch.save(ck, tmp_path / "v1.pth")
    with pytest.raises(HipsegError, match="v1.pth: made by a pre-release hipseg .* train it again"):
        load_model(tmp_path / "v1.pth")


def test_the_network_diagram_is_read_from_the_network():
    from hipseg_lib.config import make_config
    from hipseg_lib.network_view import network_diagram, network_levels

    cpu = network_levels(ResUNet3D(make_config("cpu").model))
    assert [r["channels"] for r in cpu] == [12, 24, 48, 96, 192]
    assert [r["encoder"] for r in cpu] == ["stem only", "one 3x3x3 conv", "one 3x3x3 conv", "residual block",
                                           "2 residual blocks (bottleneck)"]
    assert [r["decoder"] for r in cpu] == ["no conv: head reads concat", "one 3x3x3 conv", "one 3x3x3 conv",
                                           "residual block", None]
    assert [r["deep_supervision"] for r in cpu] == [False, True, True, True, False]
    net = ResUNet3D(make_config("cpu").model)
    assert [r["decoder_channels"] for r in cpu] == [net.head.in_channels, 24, 48, 96, None] == [24, 24, 48, 96, None]
    assert [r["down"] for r in cpu] == [None] + ["stride-2 conv"] * 4
    seed = network_levels(ResUNet3D(ModelConfig(base_channels=16, depth=4, downsample="maxpool", light_levels=0)))
    assert [r["down"] for r in seed] == [None] + ["2x2x2 max pool"] * 3
    assert seed[0]["encoder"] == "stem conv + residual block" and not any(r["deep_supervision"] for r in seed)
    fig = network_diagram(ResUNet3D(make_config("cpu").model), input_shape=(64, 64, 48))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum("1x1x1 head" in t for t in texts) == 4, "the output's head and three deep-supervision heads"
    assert "+" in texts and any("added" in t for t in texts), "their scores are summed"
    assert "level 4: 192 ch at 4x4x3" in " ".join(texts) and "level 0: 12 ch at 64x64x48" in " ".join(texts)
    assert "level 0: 24 ch at 64x64x48\nno conv" in " ".join(texts), "the decoder's top passes 12 + 12 channels on"
    plain = [t.get_text() for t in network_diagram(ResUNet3D(ModelConfig(base_channels=4, depth=3))).axes[0].texts]
    assert sum("1x1x1 head" in t for t in plain) == 1 and "+" not in plain


def test_each_deep_supervision_head_is_shown_at_its_own_grid():
    import numpy as np

    from hipseg_lib.network_view import deep_supervision_panel, head_predictions

    torch.manual_seed(0)
    net = ResUNet3D(ModelConfig(base_channels=4, depth=4, deep_supervision=True)).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    rows = head_predictions(net, x)
    assert [n for n, _ in rows] == ["level 2 head (1/4 grid)", "level 1 head (1/2 grid)", "output"]
    with torch.no_grad():
        want = net(x).argmax(1)[0].numpy()
        coarse = net.aux_heads[0](torch.zeros(1, 16, 4, 4, 2))  # a level-2 head reads 4x4x2 maps
    assert coarse.shape[2:] == (4, 4, 2)
    assert all(lab.shape == (16, 16, 8) for _, lab in rows)
    np.testing.assert_array_equal(rows[-1][1], want)
    level2 = rows[0][1]
    assert (level2.reshape(4, 4, 4, 4, 2, 4) == level2[::4, ::4, ::4][:, None, :, None, :, None]).all(), \
        "a coarse head's voxel covers 4x4x4 input voxels"
    truth = np.zeros((16, 16, 8), np.uint8)
    truth[6:10, 6:10, 3:5] = 5
    fig = deep_supervision_panel(net, x[0, 0].numpy(), truth)
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["truth"] + [n for n, _ in rows]
    spare = [a for a in fig.axes if not a.get_title()]
    assert spare and spare[0].get_legend() is not None, "the colour legend fills the empty place"
