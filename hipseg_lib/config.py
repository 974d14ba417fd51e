"""The settings of an experiment (:class:`TrainConfig`) and the presets.

A :class:`TrainConfig` holds the network's settings and the preprocessing,
and adds what training needs; it is stored in every checkpoint. Where a run
happens (the device, the precision, the cache) is not part of it: those are
arguments of the training functions.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import torch

from . import CLASS_NAMES, NUM_CLASSES, SettingsError
from .augment import augmentation_named
from .data import check_fold
from .model import ModelConfig
from .preprocess import Preprocessing

__all__ = ["TrainConfig", "PRESETS", "make_config", "checked_setting"]

_PARTS = {"model": ModelConfig, "preprocessing": Preprocessing}


def checked_setting(name: str, value, hint):
    """``value`` as the type its field is annotated with (an int where a
    float is wanted becomes a float, a list of numbers a tuple), or a
    SettingsError that names the setting: ``deep_supervision="False"``
    (a string, and true) is refused, not taken."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) \
        else (hint,)
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        if value is None and kind is type(None):
            return None
        if isinstance(value, bool) != (origin is bool):
            continue  # True is an int to Python, not to a setting
        if origin in (int, str, bool, dict) and isinstance(value, origin):
            return value
        if origin is float and _number(value, float):
            return float(value)
        if origin is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(kind)  # (int, ...) or (float, float)
            n = None if not args or args[-1] is Ellipsis else len(args)
            if (n is None or len(value) == n) and all(
                    _number(v, args[0] if args else float) for v in value):
                return tuple(value)
    wanted = " or ".join(_kind_name(k) for k in kinds)
    raise SettingsError(f"{name} must be {wanted}, got {value!r}")


def _kind_name(kind) -> str:
    if kind is float:
        return "a finite float"
    if typing.get_args(kind):  # tuple[int, int, int]
        return str(kind).replace("typing.", "")
    return getattr(kind, "__name__", str(kind))


def _number(value, kind) -> bool:
    """An int for an int setting; a finite int or float for a float one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if kind is int else math.isfinite(value)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. ``TrainConfig()`` is the
    ``cpu`` preset; :meth:`replace` changes settings, by their own names.

    Args:
        preset: the preset these settings started from.
        model: the network (:class:`~hipseg_lib.model.ModelConfig`).
        preprocessing: what every volume goes through
            (:class:`~hipseg_lib.preprocess.Preprocessing`).
        patch_shape: train on random patches of this shape cut from the
            grid (None: whole volumes); prediction then runs in windows.
        foreground_fraction: share of patches centred on an organ.
        batch_size: samples per step.
        epochs: passes over the training volumes; the learning rate decays
            to zero over them.
        lr: Adam's peak learning rate.
        weight_decay: Adam's L2 penalty on the weights.
        grad_clip: the largest gradient norm allowed (0: no clipping).
        dice_weight, ce_weight: weights of the loss's two terms.
        augmentation: ``"light"``, ``"nnunet"``, ``"none"``, or a dict of
            settings changed from nnU-Net's (:mod:`~hipseg_lib.augment`).
        seed: seeds the weights, the batches and the augmentation.
        split_seed: seeds the split by patient.
        fold, folds: cross-validation: validate on group ``fold`` of the
            non-test patients dealt into ``folds`` (None: the presets'
            split, the same test patients either way).
        val_every: validate every N epochs (and always after the last).
        early_stop_dice: stop once every class reaches this validation Dice
            (the seed project's rule); 0: off, as in every preset.

    Example:
        >>> cfg = TrainConfig().replace(depth=4, epochs=3)
        >>> cfg.model.depth, cfg.epochs
        (4, 3)
    """

    preset: str = "cpu"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(
        base_channels=8, depth=5))
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing(
        target_shape=(64, 64, 48)))
    patch_shape: tuple[int, int, int] | None = None
    foreground_fraction: float = 0.33
    batch_size: int = 1
    epochs: int = 14
    lr: float = 5e-3
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    augmentation: str | dict = "light"
    seed: int = 0
    split_seed: int = 0
    fold: int | None = None
    folds: int = 5
    val_every: int = 1
    early_stop_dice: float = 0.0

    def __post_init__(self) -> None:
        augmentation_named(self.augmentation)  # an unknown set is refused
        for name in ("batch_size", "epochs", "val_every"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, "
                                    f"got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise SettingsError("lr must be > 0, weight_decay and grad_clip "
                                ">= 0")
        if min(self.dice_weight, self.ce_weight) < 0 \
                or self.dice_weight + self.ce_weight == 0:
            raise SettingsError("dice_weight and ce_weight must be >= 0 and "
                                "not both 0")
        check_fold(self.fold, self.folds)
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise SettingsError("foreground_fraction must be in [0, 1]")
        io = (self.model.in_channels, self.model.num_classes)
        if io != (1, NUM_CLASSES):  # what the data and the metrics have
            raise SettingsError(f"in_channels must be 1 and num_classes "
                                f"{NUM_CLASSES} ({', '.join(CLASS_NAMES)}): "
                                f"got {io[0]} and {io[1]}")
        grid = self.preprocessing.target_shape
        if self.patch_shape is not None:
            patch = tuple(int(s) for s in self.patch_shape)
            object.__setattr__(self, "patch_shape", patch)
            if len(patch) != 3 or any(p > g for p, g in zip(patch, grid)):
                raise SettingsError(f"patch_shape {patch} must be 3 sizes "
                                    f"within target_shape {grid}")
        div = self.model.divisor
        for name, shape in (("target_shape", grid),
                            ("patch_shape", self.patch_shape)):
            if shape is not None and any(s % div for s in shape):
                raise SettingsError(f"{name} {shape} must be divisible by "
                                    f"{div} for depth {self.model.depth}")

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes``, each by its own name: a training setting,
        or one of the network's (``depth=4``) or the preprocessing's
        (``target_shape=(64, 64, 48)``)."""
        mine = {f.name for f in dataclasses.fields(self)} - set(_PARTS)
        parts: dict[str, dict] = {name: {} for name in _PARTS}
        own: dict = {}
        for key, value in changes.items():
            part = next((p for p, cls in _PARTS.items()
                         if key in {f.name for f in dataclasses.fields(cls)}),
                        None)
            if key in mine:
                own[key] = checked_setting(key, value, _hints(TrainConfig)[key])
            elif part is not None:
                hint = _hints(_PARTS[part])[key]
                parts[part][key] = checked_setting(key, value, hint)
            else:
                raise SettingsError(f"unknown setting: {key}")
        for name, changed in parts.items():
            if changed:
                own[name] = dataclasses.replace(getattr(self, name), **changed)
        return dataclasses.replace(self, **own)

    def flat_dict(self) -> dict:
        """Every setting by its own name, the network's and the
        preprocessing's included: the form :meth:`replace` takes."""
        out: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out.update(value.to_dict() if f.name in _PARTS else {f.name: value})
        return out

    def to_dict(self) -> dict:
        """Plain JSON values: what a checkpoint stores."""
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["preprocessing"] = self.preprocessing.to_dict()
        if self.patch_shape is not None:
            d["patch_shape"] = list(self.patch_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        model = ModelConfig.from_dict(d.pop("model"))
        prep = Preprocessing.from_dict(d.pop("preprocessing"))
        return cls(model=model, preprocessing=prep).replace(**d)


# Each preset builds the same network (model.ResUNet3D), at its own size.
PRESETS: dict[str, dict] = {
    # seconds: for tests and a first look
    "smoke": dict(target_shape=(32, 32, 16), base_channels=4, depth=3,
                  batch_size=2, epochs=2, augmentation="nnunet"),
    # 2 CPU cores: TrainConfig's defaults, chosen on the validation patients
    # (the measurements: benchmarks/results/cpu_preset.md)
    "cpu": {},
    # one modern GPU at the seed's scale: the body crop near the scans' own
    # resolution, batch 2, nnU-Net's augmentation, 600 epochs
    "full": dict(target_shape=(192, 160, 128), base_channels=16, depth=5,
                 batch_size=2, epochs=600, lr=1e-3, val_every=5,
                 dropout=0.1, augmentation="nnunet"),
}


def make_config(name: str, **changes) -> TrainConfig:
    """The settings of a named preset (``"auto"``: ``full`` where a CUDA GPU
    is present, else ``cpu``), with ``changes`` (None: no change).

    Example:
        >>> make_config("smoke", epochs=5).epochs
        5
    """
    if name == "auto":
        name = "full" if torch.cuda.is_available() else "cpu"
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}: choose one of "
                            f"{', '.join(PRESETS)} or auto")
    changes = {k: v for k, v in changes.items() if v is not None}
    return TrainConfig(preset=name).replace(**{**PRESETS[name], **changes})
