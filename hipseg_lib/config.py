"""Training settings: :class:`TrainConfig` and the named presets.

A :class:`TrainConfig` holds the network's :class:`~hipseg_lib.model.ModelConfig` and the
:class:`~hipseg_lib.preprocess.Preprocessing`, and adds what only training needs. Each of the
three validates itself and has a symmetric ``to_dict``/``from_dict``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch

from . import SettingsError
from .augment import augmentation_named
from .model import ModelConfig
from .preprocess import Preprocessing

__all__ = ["TrainConfig", "PRESETS", "make_config", "resolve_preset", "parse_settings", "SettingsError",
           "FLAGGED_SETTINGS", "setting_kinds"]


_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
_PREP_KEYS = frozenset(f.name for f in dataclasses.fields(Preprocessing))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoints).

    ``TrainConfig()`` is the ``cpu`` preset; :func:`make_config` gives any named preset, then
    :meth:`replace` changes settings.

    Args:
        preset: name of the preset these settings started from.
        model: the network (:class:`ModelConfig`: ``base_channels``, ``depth``, ``dropout``,
            ``deep_supervision``, ``downsample``, ``light_levels``, ``top_kernel``).
        preprocessing: what every volume goes through (:class:`Preprocessing`: ``target_shape``,
            the grid every volume is resized to, and more).
        patch_shape: train on patches of this shape cut from the ``target_shape`` grid (None: whole
            volumes). Validation and prediction still see whole volumes.
        foreground_fraction: share of patches centred on a voxel of a random foreground class
            present in the volume (nnU-Net's oversampling); the rest are placed uniformly.
        batch_size: volumes (or patches) per step (per process under torchrun).
        epochs: planned epochs: the run's length in work, the same on every machine (the
            learning-rate schedule decays over them).
        lr: peak learning rate of Adam; decays polynomially (power 0.9) to 0, after a short warm-up.
        weight_decay: Adam weight decay.
        grad_clip: gradient-norm clipping threshold (0 = off).
        dice_weight, ce_weight: weights of the soft Dice and the cross-entropy terms of the loss
            (:class:`~hipseg_lib.loss.DiceCELoss`); one may be 0, not both.
        amp: mixed precision: "auto" (bf16 on a CUDA device that supports it, fp16 on other CUDA
            devices; bf16 on a CPU with native bf16, else off), "bf16", "fp16" or "off".
        channels_last: use the channels-last 3D memory format.
        compile: wrap the model in ``torch.compile`` (falls back to eager if compilation fails).
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        seed: seeds Python, numpy and torch, the split and the augmentation.
        split_seed: seed of the case-level split (kept apart so that seeds of repeat runs can vary).
        augment: augment the training batches.
        augmentation: which set (:data:`~hipseg_lib.augment.AUGMENTATIONS`): ``"nnunet"`` (nnU-Net's
            default transforms, probabilities and ranges), ``"light"`` (the same transforms, lighter:
            for short runs), or a dict of settings changed from nnU-Net's.
        early_stop_dice: stop once every class reaches this validation Dice (the seed's rule of a
            pass, not the best the data allows); 0 = off. No preset uses it.
        patience: stop after this many validations without a better mean Dice; 0 = off.
        max_minutes: a safety net on training time; 0 = no limit. When the epochs measured so far
            show that the planned ones will not fit, the run is shortened to the epochs that do,
            and the learning rate decays to zero over that shorter run; the log says so loudly.
        val_every: validate every N epochs (and always the run's last epoch).
        save_every_epoch: write ``last.pth`` after every epoch; otherwise after each validation and at
            the stop (a resumed run repeats at most the epochs since).
        data_on: where the training volumes live during the run (:class:`~hipseg_lib.data.TrainingSet`):
            "auto" (the training device when they take at most a quarter of its free memory, else
            the host), "device" or "host". Batches are augmented on the training device either way.
        cache_dir: preprocessing cache (default ``~/.cache/hipseg``).

    Example:
        >>> cfg = TrainConfig().replace(depth=5, target_shape=(64, 64, 48), epochs=3)
        >>> cfg.model.depth, cfg.preprocessing.target_shape, cfg.epochs
        (5, (64, 64, 48), 3)
        >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    preset: str = "cpu"
    # The cpu preset's network: 5 levels of 12-192 channels, the three finest light, deep supervision.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_channels=12, depth=5, deep_supervision=True,
                                                                   light_levels=3, top_kernel=0))
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing(target_shape=(64, 64, 48)))
    patch_shape: tuple[int, int, int] | None = None
    foreground_fraction: float = 0.0
    batch_size: int = 1
    epochs: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    split_seed: int = 0
    augment: bool = True
    augmentation: str | dict = "light"
    early_stop_dice: float = 0.0
    patience: int = 0
    max_minutes: float = 25.0
    val_every: int = 1
    save_every_epoch: bool = False
    data_on: str = "auto"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig) or not isinstance(self.preprocessing, Preprocessing):
            raise SettingsError("model must be a ModelConfig and preprocessing a Preprocessing")
        if self.patch_shape is not None:
            patch = tuple(int(s) for s in self.patch_shape)
            object.__setattr__(self, "patch_shape", patch)
            target = self.preprocessing.target_shape
            if len(patch) != 3 or any(p > t for p, t in zip(patch, target)):
                raise SettingsError(f"patch_shape {patch} must be 3 sizes within target_shape {target}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise SettingsError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        augmentation_named(self.augmentation)  # raises ValueError for an unknown set or setting
        if min(self.dice_weight, self.ce_weight) < 0 or self.dice_weight + self.ce_weight == 0:
            raise SettingsError(f"dice_weight and ce_weight must be >= 0 and not both 0, got "
                             f"{self.dice_weight} and {self.ce_weight}")
        if self.data_on not in ("auto", "device", "host"):
            raise SettingsError(f"data_on must be auto, device or host, got {self.data_on!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise SettingsError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        for name in ("batch_size", "epochs", "val_every"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SettingsError(f"lr must be > 0, got {self.lr}")
        div = self.model.divisor
        for name, shape in (("target_shape", self.preprocessing.target_shape), ("patch_shape", self.patch_shape)):
            if shape is not None and any(s % div for s in shape):
                raise SettingsError(f"{name} {shape} must be divisible by {div} for depth {self.model.depth}")

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with ``overrides`` applied.

        A setting of the network or of the preprocessing may be given by its own name
        (``depth=5``, ``target_shape=(64, 64, 48)``), or the whole part as ``model=`` /
        ``preprocessing=`` (a config, or a dict of the settings to change).
        """
        own = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - own - _MODEL_KEYS - _PREP_KEYS
        if unknown:
            raise SettingsError(f"unknown training settings: {', '.join(sorted(unknown))}")
        mine = {k: v for k, v in overrides.items() if k in own}
        for part, keys in (("model", _MODEL_KEYS), ("preprocessing", _PREP_KEYS)):
            current = mine.pop(part, getattr(self, part))
            if isinstance(current, dict):
                current = dataclasses.replace(getattr(self, part), **current)
            changes = {k: v for k, v in overrides.items() if k in keys}
            mine[part] = dataclasses.replace(current, **changes) if changes else current
        return dataclasses.replace(self, **mine)

    def to_dict(self) -> dict:
        """Plain JSON values; the network and the preprocessing as nested dicts."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"], d["preprocessing"] = self.model.to_dict(), self.preprocessing.to_dict()
        d["patch_shape"] = list(self.patch_shape) if self.patch_shape is not None else None
        return d

    def key_settings(self, always: tuple[str, ...] = ("preset", "epochs", "batch_size", "lr",
                                                        "target_shape", "base_channels", "depth", "amp",
                                                        "augmentation")) -> dict:
        """The settings a reader of this run needs first: ``always``, then every other setting whose
        value differs from :class:`TrainConfig`'s default, the ``cpu`` preset (what another preset
        or an override chose).

        Example:
            >>> "weight_decay" in TrainConfig().key_settings()
            False
        """
        flat, default = self.flat_dict(), TrainConfig().flat_dict()
        return {k: v for k, v in flat.items() if k in always or v != default[k]}

    def flat_dict(self) -> dict:
        """Every setting by its own name, the network's and the preprocessing's included: one row
        per setting for a table, and valid overrides (``make_config(name, **cfg.flat_dict())``)."""
        d = self.to_dict()
        return {k: v for part in (d, d.pop("model"), d.pop("preprocessing")) for k, v in part.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        model = ModelConfig.from_dict(d.pop("model"))
        prep = Preprocessing.from_dict(d.pop("preprocessing"))
        return cls(model=model, preprocessing=prep).replace(**d)


PRESETS: dict[str, dict] = {
    # Seconds: for tests and a first look.
    "smoke": dict(target_shape=(32, 32, 16), base_channels=4, depth=3, batch_size=2, epochs=2, max_minutes=0.0,
                  deep_supervision=False, light_levels=1, top_kernel=3, augmentation="nnunet"),
    # 2 CPU cores: TrainConfig's defaults. The body crop at 64x64x48, whole volumes, batch 1, a fixed
    # 16 epochs (1264 steps) on every CPU. The network spends little at the three finest levels
    # (stride-2 convolutions, one convolution instead of a residual block on each side, no
    # convolution after the last concatenation); deep supervision (Isensee et al. 2017) brings the
    # small organs in early. What each choice measured: benchmarks/results/HISTORY.md. 25 minutes is
    # a safety net only; if it is hit, the run is shortened loudly and still decays to zero.
    "cpu": {},
    # One modern GPU at the seed's scale: the body crop at about native in-plane resolution
    # (192x160 of ~1.8 mm voxels covers the ~350x280 mm body), 128 slices, batch 2, bf16, a fixed
    # schedule, the best validation checkpoint kept (nnU-Net's way; the seed's "stop once every
    # class reaches 0.7" is early_stop_dice, off). 600 epochs of the real set's ~169 training volumes
    # are planned by hipseg_lib.plan.plan_run at an assumed MFU (make gpu-check measures the real
    # one). max_minutes is a safety net.
    "full": dict(target_shape=(192, 160, 128), base_channels=16, depth=5, batch_size=2, epochs=600,
                 lr=1e-3, val_every=5, max_minutes=60.0, dropout=0.1, light_levels=1, top_kernel=3,
                 augmentation="nnunet"),
}


def resolve_preset(name: str) -> str:
    """A preset's name, with ``"auto"`` decided: ``full`` when a CUDA device is present, else ``cpu``
    (the one place where it is)."""
    if name == "auto":
        return "full" if torch.cuda.is_available() else "cpu"
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} or auto")
    return name


def make_config(name: str, **overrides) -> TrainConfig:
    """Settings of a named preset (``smoke``, ``cpu``, ``full``, or ``auto``: :func:`resolve_preset`)
    with ``overrides`` applied. Overrides that are None are ignored (unset command-line flags).

    Example:
        >>> make_config("cpu", epochs=5).epochs
        5
    """
    name = resolve_preset(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(preset=name).replace(**PRESETS[name]).replace(**overrides)


# The settings with a flag of their own in ``hipseg train`` (every other one goes by ``--set``) and a
# parameter of their own in the training chapter: one list for both.
FLAGGED_SETTINGS: tuple[str, ...] = ("epochs", "batch_size", "lr", "target_shape", "base_channels", "depth",
                                     "device", "amp", "seed", "max_minutes", "dice_weight", "patience",
                                     "cache_dir", "compile", "channels_last")


def setting_kinds() -> dict[str, type]:
    """The Python type of every setting's value, by its own name (the network's and the
    preprocessing's included), read from the dataclasses: what a flag parses its text into."""
    kinds: dict[str, type] = {}
    for cls in (TrainConfig, ModelConfig, Preprocessing):
        for f in dataclasses.fields(cls):
            if f.name in ("model", "preprocessing"):
                continue
            factory = cast(Callable[[], Any], f.default_factory)
            default = f.default if f.default is not dataclasses.MISSING else factory()
            kinds[f.name] = tuple if f.name.endswith("_shape") else type(default) if default is not None else str
    return kinds


def parse_settings(items) -> dict:
    """``["epochs=3", "target_shape=[64,64,48]", "amp=off"]`` -> a dict of overrides (``--set``).

    Each value is read as JSON, else kept as a string.
    """
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SettingsError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
