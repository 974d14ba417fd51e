from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hipseg_lib.config import PRESETS, make_config
from hipseg_lib.loss import DeepSupervisionLoss, DiceCELoss
from hipseg_lib.model import Downsample, ModelConfig, ResidualBlock, ResUNet3D, UpBlock, count_parameters
from hipseg_lib.network_view import head_predictions, network_diagram, network_levels


@pytest.mark.parametrize("depth, shape", [(2, (8, 8, 4)), (3, (16, 16, 8)), (4, (32, 16, 8))])
@pytest.mark.parametrize("downsample", ["maxpool", "conv"])
def test_output_shape_in_evaluation_and_every_head_in_training(depth, shape, downsample):
    net = ResUNet3D(ModelConfig(base_channels=4, depth=depth, downsample=downsample))
    assert net.eval()(torch.randn(2, 1, *shape)).shape == (2, 6, *shape)
    outs = net.train()(torch.randn(2, 1, *shape))
    assert [tuple(o.shape) for o in outs] == [(2, 6, *(s // 2 ** i for s in shape)) for i in range(depth - 1)]
    plain = ResUNet3D(ModelConfig(base_channels=4, depth=depth, deep_supervision=False))
    assert plain.train()(torch.randn(2, 1, *shape)).shape == (2, 6, *shape), "one head: one tensor"
    assert len(plain.heads) == 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_a_residual_block_at_every_encoder_level_and_in_the_bottleneck(preset):
    """The canonical network everywhere: a preset changes the size, never the structure."""
    net = ResUNet3D(make_config(preset).model)
    depth = net.config.depth
    assert len(net.encoder) == depth - 1 and all(isinstance(b, ResidualBlock) for b in net.encoder)
    assert isinstance(net.bottleneck, ResidualBlock)
    assert len(net.down) == depth - 1 and all(isinstance(d, Downsample) for d in net.down)
    assert all(isinstance(u, UpBlock) and isinstance(u.up, nn.ConvTranspose3d) for u in net.decoder)
    assert net.config.downsample == "maxpool", "the seed's downsampling in every preset"
    structure = {k: v for k, v in net.config.to_dict().items() if k not in ("base_channels", "depth", "dropout")}
    assert structure == {k: v for k, v in ResUNet3D(make_config("cpu").model).config.to_dict().items()
                         if k in structure}


def test_residual_block_shortcut_and_dropout():
    blk = ResidualBlock(4, 8, dropout=0.5)
    assert isinstance(blk.shortcut, torch.nn.Conv3d)
    assert isinstance(ResidualBlock(4, 4).shortcut, nn.Identity)
    x = torch.randn(1, 4, 8, 8, 8)
    blk.train()
    assert not torch.equal(blk(x), blk(x)), "dropout is active in training"
    blk.eval()
    assert torch.equal(blk(x), blk(x)), "and off in evaluation"
    path = blk.conv2(blk.pre2(blk.conv1(blk.pre1(x))))
    assert torch.allclose(blk(x), path + blk.shortcut(x), atol=1e-6), "the convolutions plus the shortcut"
    same = ResidualBlock(4, 4).eval()
    nn.init.zeros_(same.conv2.weight)
    assert torch.equal(same(x), x), "a zero correction gives the input back"


def test_skips_are_concatenated_and_upsampling_is_a_transposed_convolution():
    up = UpBlock(16, 8, 8)
    coarse, skip = torch.randn(1, 16, 4, 4, 2), torch.randn(1, 8, 8, 8, 4)
    assert up(coarse, skip).shape == (1, 8, 8, 8, 4)
    assert up.conv.in_channels == 16, "the upsampled 8 channels beside the skip's 8"
    seen = []
    up.conv.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    up(coarse, skip)
    assert torch.equal(seen[0][:, 8:], up.pre(torch.cat([up.up(coarse), skip], 1))[:, 8:])


def test_indivisible_input_is_a_clear_error():
    net = ResUNet3D(ModelConfig(base_channels=4, depth=3))
    with pytest.raises(ValueError, match=r"spatial size \(16, 16, 6\) is not divisible by 4"):
        net(torch.zeros(1, 1, 16, 16, 6))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.zeros(1, 2, 16, 16, 8))


def test_bad_configs():
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=1)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="downsample"):
        ModelConfig(downsample="avgpool")
    with pytest.raises(ValueError, match="unknown network settings: light_levels"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "light_levels": 3})


def test_config_round_trip_keeps_every_setting():
    cfg = ModelConfig(base_channels=12, depth=5, downsample="conv", deep_supervision=False, dropout=0.1)
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_width_and_depth_change_parameters():
    small = ResUNet3D(ModelConfig(base_channels=4, depth=3))
    assert count_parameters(small) < count_parameters(ResUNet3D(ModelConfig(base_channels=8, depth=3)))
    assert count_parameters(small) < count_parameters(ResUNet3D(ModelConfig(base_channels=4, depth=4)))


@pytest.mark.parametrize("design", [dict(), dict(downsample="conv"), dict(deep_supervision=False)])
def test_overfits_one_small_volume(design):
    """The network drives the loss well down on one volume (CPU, seconds)."""
    torch.manual_seed(0)
    y = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    y[:, 2:14, 2:14, :] = 1
    y[:, 4:8, 4:8, 2:6] = 2
    y[:, 9:13, 5:9, 1:5] = 3
    y[:, 8:11, 10:13, 2:5] = 4
    y[:, 5:7, 10:12, 3:5] = 5
    x = torch.randn(1, 1, 16, 16, 8) * 0.3 + y.float()[:, None] * 0.5  # learnable but noisy
    net = ResUNet3D(ModelConfig(base_channels=8, depth=3, **design))
    loss_fn = DeepSupervisionLoss(DiceCELoss(6), len(net.heads))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = loss_fn(net.train()(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    assert (net.eval()(x).argmax(1) == y).float().mean() > 0.95


def test_deep_supervision_gives_every_head_a_loss_of_its_own():
    """Each head is trained by its own loss: the coarse heads' gradients come from their own terms,
    and their scores never enter the full-resolution output."""
    torch.manual_seed(0)
    net = ResUNet3D(ModelConfig(base_channels=4, depth=4))
    x, y = torch.randn(1, 1, 16, 16, 8), torch.randint(0, 6, (1, 16, 16, 8))
    outs = net.train()(x)
    loss = DeepSupervisionLoss(DiceCELoss(6), len(outs))(outs, y)
    loss.backward()
    assert all(h[1].weight.grad.abs().sum() > 0 for h in net.heads), "every head learns"
    net.zero_grad()
    net.train()(x)[0].sum().backward()  # the full-resolution output alone
    assert all(h[1].weight.grad is None or h[1].weight.grad.abs().sum() == 0 for h in net.heads[1:]), \
        "the coarse heads do not feed the output: they are not summed into it"
    with torch.no_grad():
        before = net.eval()(x)
        for h in net.heads[1:]:
            nn.init.normal_(h[1].weight)
        assert torch.equal(before, net(x)), "changing a coarse head leaves the output as it was"


def test_the_network_diagram_is_read_from_the_network():
    net = ResUNet3D(ModelConfig(base_channels=4, depth=4))
    rows = network_levels(net)
    assert [r["channels"] for r in rows] == [4, 8, 16, 32]
    assert [r["down"] for r in rows] == [None, "2x2x2 max pool", "2x2x2 max pool", "2x2x2 max pool"]
    assert all(r["encoder"].startswith("residual block") for r in rows)
    weights = [r["head_weight"] for r in rows if r["head_weight"] is not None]
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    plain = network_levels(ResUNet3D(ModelConfig(base_channels=4, depth=4, deep_supervision=False)))
    assert [r["head_weight"] for r in plain] == [1.0, None, None, None]
    import matplotlib.pyplot as plt

    fig = network_diagram(net, "t", (16, 16, 8))
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "loss weight 0.57" in texts and "32 ch at 2x2x1" in texts
    plt.close(fig)


def test_each_head_is_shown_at_its_own_grid():
    net = ResUNet3D(ModelConfig(base_channels=4, depth=4)).eval()
    rows = head_predictions(net, torch.zeros(1, 1, 16, 16, 8))
    assert [n for n, _ in rows] == ["output (full grid)", "level 1 head (1/2 grid)", "level 2 head (1/4 grid)"]
    assert all(lab.shape == (16, 16, 8) for _, lab in rows)
    assert not net.training, "the mode is handed back"
