"""The three configs: each validates itself and round-trips through plain JSON."""
from __future__ import annotations

import json

import pytest

from hipseg_lib import SettingsError
from hipseg_lib.config import PRESETS, TrainConfig, make_config
from hipseg_lib.model import ModelConfig
from hipseg_lib.preprocess import Preprocessing


def _json(d: dict) -> dict:
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("cfg", [
    ModelConfig(base_channels=8, depth=3, dropout=0.1, deep_supervision=True, downsample="maxpool"),
    Preprocessing(target_shape=(32, 32, 16), clip_percentiles=(1, 99), crop_foreground=False, orientation="RAS"),
    *[make_config(name) for name in PRESETS],
    make_config("cpu", patch_shape=(32, 32, 16), foreground_fraction=0.5, seed=3),
])
def test_to_dict_from_dict_round_trip_through_json(cfg):
    d = cfg.to_dict()
    assert _json(d) == d, "plain JSON values only (lists, not tuples)"
    assert type(cfg).from_dict(_json(d)) == cfg


def test_train_config_holds_the_network_and_the_preprocessing():
    cfg = make_config("cpu", depth=4, target_shape=(64, 64, 32), crop_foreground=False, epochs=2)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.preprocessing, Preprocessing)
    assert (cfg.model.depth, cfg.model.base_channels) == (4, TrainConfig().model.base_channels)
    assert cfg.preprocessing == Preprocessing(target_shape=(64, 64, 32), crop_foreground=False)
    assert cfg.to_dict()["model"] == cfg.model.to_dict()
    # flat_dict: one row per setting, and valid overrides that rebuild the same config.
    flat = cfg.flat_dict()
    assert flat["depth"] == 4 and flat["target_shape"] == [64, 64, 32] and "model" not in flat
    assert make_config("cpu", **flat) == cfg


def test_each_config_validates_itself():
    with pytest.raises(ValueError, match="depth must be >= 2"):
        ModelConfig(depth=1)
    with pytest.raises(ValueError, match="downsample"):
        make_config("cpu", downsample="avgpool")
    with pytest.raises(ValueError, match="clip_percentiles"):
        make_config("cpu", clip_percentiles=(50, 10))
    with pytest.raises(ValueError, match="target_shape .* divisible by 16"):
        make_config("cpu", target_shape=(64, 64, 40))
    with pytest.raises(ValueError, match="unknown setting: colour"):
        make_config("cpu", colour="red")
    with pytest.raises(ValueError, match="patch_shape .* within target_shape"):
        make_config("cpu", patch_shape=(128, 64, 48))
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="unknown network settings: colour"):
        ModelConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="unknown preprocessing settings: colour"):
        Preprocessing.from_dict({"target_shape": [8, 8, 8], "colour": 1})


def test_only_todays_settings_are_read():
    """The pre-release readers are gone: a setting under an old name, or a flat dict of training
    settings, is refused rather than guessed at."""
    with pytest.raises(ValueError, match="unknown network settings: light_top"):
        ModelConfig.from_dict({"base_channels": 4, "depth": 3, "light_top": True})
    flat = {"preset": "smoke", "target_shape": [32, 32, 16], "base_channels": 4, "depth": 3, "epochs": 2}
    with pytest.raises(KeyError):
        TrainConfig.from_dict(flat)


def test_augmentation_is_a_named_set_or_changes_to_nnunets():
    from hipseg_lib.augment import AUGMENTATIONS, RandomAugmentation, augmentation_named

    assert augmentation_named("nnunet") == RandomAugmentation() == AUGMENTATIONS["nnunet"]
    assert make_config("full").augmentation == "nnunet", "the GPU preset trains with nnU-Net's set"
    cfg = make_config("cpu", augmentation={"p_noise": 0.0, "scaling": [0.9, 1.1]})
    aug = augmentation_named(cfg.augmentation)
    assert aug.p_noise == 0.0 and aug.scaling == (0.9, 1.1) and aug.p_blur == RandomAugmentation().p_blur
    assert TrainConfig.from_dict(_json(cfg.to_dict())) == cfg
    with pytest.raises(ValueError, match="unknown augmentation settings: p_wobble"):
        make_config("cpu", augmentation={"p_wobble": 1.0})
    with pytest.raises(ValueError, match="augmentation must be one of"):
        make_config("cpu", augmentation="heavy")
    assert augmentation_named("none") is None, "no augmentation"


def test_the_defaults_are_the_cpu_preset_and_the_loss_weights_are_checked():
    assert TrainConfig() == make_config("cpu"), "the defaults are the cpu preset, not a preset of their own"
    assert make_config("auto").preset == ("full" if __import__("torch").cuda.is_available() else "cpu")
    assert make_config("cpu", epochs=None).epochs == TrainConfig().epochs, "None: no change"
    with pytest.raises(ValueError, match="not both 0"):
        make_config("cpu", dice_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="dice_weight and ce_weight"):
        make_config("cpu", dice_weight=-1.0)


def test_a_setting_of_the_wrong_type_is_refused_by_name_and_numbers_are_coerced():
    from hipseg_lib.cli import parse_settings

    with pytest.raises(SettingsError, match="deep_supervision must be bool, got 'False'"):
        make_config("smoke", deep_supervision="False")  # a non-empty string would be true
    with pytest.raises(SettingsError, match="epochs must be int, got 2.5"):
        make_config("smoke", epochs=2.5)
    with pytest.raises(SettingsError, match="batch_size must be int, got True"):
        make_config("smoke", batch_size=True)
    cfg = make_config("smoke", lr=1, target_shape=[32, 32, 16], patch_shape=None)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.preprocessing.target_shape == (32, 32, 16)
    assert parse_settings(["deep_supervision=False", "dropout=0.1"]) == {"deep_supervision": False, "dropout": 0.1}
    assert make_config("smoke", **parse_settings(["deep_supervision=False"])).model.deep_supervision is False


def test_the_network_has_the_datas_channels_and_classes():
    """The data have one image channel and six classes: a network with others is refused by name,
    not left to fail inside the loss."""
    from hipseg_lib.config import make_config

    for changes, got in (({"num_classes": 3}, "got 1 and 3"), ({"in_channels": 2}, "got 2 and 6")):
        with pytest.raises(SettingsError, match=f"in_channels must be 1 and num_classes 6 .*: {got}"):
            make_config("smoke", **changes)


@pytest.mark.parametrize("change, message", [
    (dict(clip_percentiles=[1, 2, 3]), r"clip_percentiles must be tuple\[float, float\], got \[1, 2, 3\]"),
    (dict(target_shape=[64.9, 64, 48]), r"target_shape must be tuple\[int, int, int\], got \[64.9, 64, 48\]"),
    (dict(lr=float("nan")), "lr must be a finite float, got nan"),
    (dict(grad_clip=float("inf")), "grad_clip must be a finite float, got inf"),
    (dict(augmentation={"scaling": [1.4, 0.7]}), r"scaling must be a range \(low, high\)"),
    (dict(augmentation={"noise_std": [-0.1, 0.1]}), r"noise_std must be a range \(low, high\)"),
])
def test_a_setting_out_of_shape_or_range_is_refused_by_name(change, message):
    """Numbers that are not finite, tuples of the wrong length or kind, ranges upside down: each is
    a SettingsError naming the setting (never a truncated value or a traceback)."""
    with pytest.raises(SettingsError, match=message):
        make_config("cpu", **change)


def test_a_bad_setting_on_the_command_line_is_one_line(tmp_path):
    from test_cli import _one_line_error, run_cli

    r = run_cli("train", "--preset", "smoke", "--set", "clip_percentiles=[1,2,3]", "--out", tmp_path / "m")
    _one_line_error(r, "clip_percentiles must be tuple[float, float]")
