"""Training: presets, the loop, validation, early stopping, checkpoints and resume.

One code path serves the training chapter, ``hipseg train`` and
``torchrun -m hipseg_lib train`` (DistributedDataParallel: NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import BEST_NAME, LAST_NAME, LOG_NAME, NUM_CLASSES, HipsegError, first_line
from ._atomic import atomic_path
from .augment import RandomPatch, default_augmentation
from .checkpoint import read_checkpoint, save_checkpoint
from .data import SegmentationDataset, cache_pairs, split_by_case
from .io import find_pairs
from .loss import DiceCELoss
from .metrics import dice_per_class
from .model import ModelConfig, ResUNet3D
from .preprocess import Preprocessing

__all__ = ["archive_previous_run", "early_stop_reason", "TrainConfig", "PRESETS", "preset", "resolve_device", "seed_everything", "train",
           "TrainResult", "BEST_NAME", "LAST_NAME", "LOG_NAME", "load_split_volumes", "autocast_for"]



@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoints).

    Use :func:`preset` for the named settings, then override fields.

    Args:
        preset: name of the preset these settings started from.
        target_shape: grid every volume is resized to.
        base_channels, depth, dropout, deep_supervision, downsample, light_top: the network
            (:class:`ModelConfig`).
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
        amp: mixed precision: "auto" (bf16 on a CUDA device that supports it, fp16 on other CUDA
            devices; bf16 on a CPU with native bf16, else off), "bf16", "fp16" or "off".
        channels_last: use the channels-last 3D memory format.
        compile: wrap the model in ``torch.compile`` (falls back to eager if compilation fails).
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
        seed: seeds Python, numpy and torch, the split and the augmentation.
        split_seed: seed of the case-level split (kept apart so that seeds of repeat runs can vary).
        augment: use the default augmentation.
        early_stop_dice: stop once every class reaches this validation Dice (the seed's rule); 0 = off.
        patience: stop after this many validations without a better mean Dice; 0 = off.
        max_minutes: a safety net on training time; 0 = no limit. When the epochs measured so far
            show that the planned ones will not fit, the run is shortened to the epochs that do,
            and the learning rate decays to zero over that shorter run; the log says so loudly.
        val_every: validate every N epochs.
        num_workers: data-loader worker processes.
        cache_dir: preprocessing cache (default ``~/.cache/hipseg``).
    """

    preset: str = "cpu"
    target_shape: tuple[int, int, int] = (64, 64, 32)
    base_channels: int = 16
    depth: int = 4
    dropout: float = 0.0
    deep_supervision: bool = False
    downsample: str = "conv"
    light_top: bool = True
    patch_shape: tuple[int, int, int] | None = None
    foreground_fraction: float = 0.0
    batch_size: int = 2
    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    split_seed: int = 0
    augment: bool = True
    early_stop_dice: float = 0.7
    patience: int = 10
    max_minutes: float = 0.0
    val_every: int = 1
    num_workers: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.target_shape = tuple(int(s) for s in self.target_shape)  # type: ignore[assignment]
        if self.patch_shape is not None:
            self.patch_shape = tuple(int(s) for s in self.patch_shape)  # type: ignore[assignment]
            if len(self.patch_shape) != 3 or any(p > t for p, t in zip(self.patch_shape, self.target_shape)):
                raise ValueError(f"patch_shape {self.patch_shape} must be 3 sizes within target_shape "
                                 f"{self.target_shape}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        for name in ("batch_size", "epochs", "val_every", "base_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        div = self.model_config.divisor  # also checks the network settings
        for name in ("target_shape", "patch_shape"):
            shape = getattr(self, name)
            if shape is not None and any(s % div for s in shape):
                raise ValueError(f"{name} {shape} must be divisible by {div} for depth {self.depth}")

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(base_channels=self.base_channels, depth=self.depth, dropout=self.dropout,
                           deep_supervision=self.deep_supervision, num_classes=NUM_CLASSES,
                           downsample=self.downsample, light_top=self.light_top)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(target_shape=self.target_shape)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_shape"] = list(self.target_shape)
        d["patch_shape"] = list(self.patch_shape) if self.patch_shape is not None else None
        return d

    def replace(self, **overrides) -> "TrainConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, dict] = {
    # Seconds: for tests and a first look.
    "smoke": dict(target_shape=(32, 32, 16), base_channels=4, depth=3, batch_size=2, epochs=2,
                  lr=2e-3, patience=0, early_stop_dice=0.0, augment=True),
    # 2 CPU cores: the body crop at 64x64x48, whole volumes, batch 1, a fixed 12 epochs (948 steps)
    # on every CPU: the network spends little at full resolution (stride-2 convolutions, light top
    # level): measured 0.5 s/step in fp32 and 0.28 s/step in bf16 on 2 cores. 25 minutes is a
    # safety net only; if it is hit, the run is shortened loudly and still decays to zero.
    "cpu": dict(target_shape=(64, 64, 48), base_channels=12, depth=5, batch_size=1, epochs=12,
                lr=2e-3, patience=0, early_stop_dice=0.0, max_minutes=25.0),
    # One GPU at the seed's scale: the body crop at about native in-plane resolution
    # (192x160 of ~1.8 mm voxels covers the ~350x280 mm body), 128 slices, batch 2, mixed precision.
    "full": dict(target_shape=(192, 160, 128), base_channels=16, depth=5, batch_size=2, epochs=16,
                 lr=1e-3, patience=8, early_stop_dice=0.7, amp="auto", num_workers=4,
                 deep_supervision=True, dropout=0.1),
}


def preset(name: str, **overrides) -> TrainConfig:
    """Settings of a named preset (``smoke``, ``cpu``, ``full``) with ``overrides`` applied.

    ``"auto"`` picks ``full`` when a CUDA device is present and ``cpu`` otherwise.

    Example:
        >>> preset("cpu", epochs=5).epochs
        5
    """
    if name == "auto":
        name = "full" if torch.cuda.is_available() else "cpu"
    if name not in PRESETS:
        raise HipsegError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} or auto")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(preset=name, **PRESETS[name]).replace(**overrides)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> the local CUDA device when present, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HipsegError(f"device {device!r} requested but no CUDA device is available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, amp: str):
    """The autocast context and dtype for ``amp`` on ``device`` (``nullcontext`` when off)."""
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and _cpu_bf16():
            amp = "bf16"
        else:
            return contextlib.nullcontext(), None
    if amp == "off":
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), dtype


def archive_previous_run(out_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's checkpoints and log into ``out_dir/previous/<time>/`` (nothing is deleted).

    Returns:
        The archive folder, or None when ``out_dir`` held no earlier run.
    """
    out = Path(out_dir)
    files = [out / n for n in (BEST_NAME, LAST_NAME, LOG_NAME) if (out / n).exists()]
    if not files:
        return None
    dest = out / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for f in files:
        os.replace(f, dest / f.name)
    return dest


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> bool:
    """Whether this CPU has native bf16 (AVX512-BF16/AMX), where bf16 autocast speeds training up."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 holds the full picture)."""

    history: list[dict] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None
    stopped_because: str = ""
    best_val_dice: list[float] | None = None
    seconds: float = 0.0


def load_split_volumes(data_dir: str | os.PathLike, cfg: TrainConfig, progress: bool = False):
    """Find pairs, split by case and preprocess (cached): ``{"train": [...], "val": [...], "test": [...]}``."""
    search = find_pairs(data_dir)
    if not search.pairs:
        raise HipsegError(f"{data_dir}: no image/label pairs found")
    split = split_by_case(search.pairs, seed=cfg.split_seed)
    return {name: cache_pairs(pairs, cfg.preprocessing, cfg.cache_dir, progress=progress)
            for name, pairs in split.items()}


class _Dist:
    """Process-group helpers; a no-op in a single process."""

    def __init__(self, device_pref: str):
        # Under torchrun (which sets these), even with one process: a process group is made, so a
        # one-GPU torchrun run initialises NCCL exactly as a multi-GPU one does.
        self.enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
            "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ)
        if self.enabled and not dist.is_initialized():
            cuda = torch.cuda.is_available() and device_pref != "cpu"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            self.owns_group = True
        else:
            self.owns_group = False
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.backend = dist.get_backend() if self.enabled else "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (so that all ranks take the same decision)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64,
                         device=torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def main_first(self, fn, then_others: bool = True):
        """Run ``fn`` on rank 0, then (``then_others``) on the other ranks: e.g. fill a cache once.

        A ``HipsegError`` on rank 0 is passed to every rank, so that each ends with the same one
        line instead of waiting in a collective that rank 0 never reaches.
        """
        if not self.enabled:
            return fn()
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        if self.main:
            try:
                out = fn()
            except HipsegError as exc:
                dist.broadcast_object_list([str(exc)], src=0, device=device)
                raise
            dist.broadcast_object_list([None], src=0, device=device)
            return out
        message = [None]
        dist.broadcast_object_list(message, src=0, device=device)
        if message[0] is not None:
            raise HipsegError(message[0])
        return fn() if then_others else None

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def early_stop_reason(val_dice: np.ndarray, since_best: int, threshold: float, patience: int) -> str:
    """Why training should stop after a validation, or "" to go on.

    The seed's rule: every class (NaN = absent everywhere, ignored) reaches ``threshold``;
    and a patience limit: ``since_best`` validations without a better mean Dice.
    """
    if threshold > 0 and np.all(np.nan_to_num(np.asarray(val_dice, float), nan=1.0) >= threshold):
        return f"every class reached validation Dice >= {threshold:g}"
    if patience > 0 and since_best >= patience:
        return f"no better validation Dice for {patience} validations"
    return ""


def _check_writable(out: Path) -> None:
    """Refuse early (before any work) an output folder that cannot be created or written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HipsegError(f"{out}: cannot create the output folder ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise HipsegError(f"{out}: output folder is not writable")


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class PolySchedule:
    """Learning rate: linear warm-up, then polynomial decay (power 0.9) to zero at the run's end.

    The decay follows a progress fraction that each step advances. :meth:`replan` changes how
    many steps remain, so a run shortened by the time limit still ends at zero learning rate,
    with no jump, instead of stopping mid-schedule.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = PolySchedule(opt, total_steps=10, warmup=2)
        >>> for _ in range(10):
        ...     opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"]
        0.0
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, power: float = 0.9):
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.warmup = max(0, min(warmup, total_steps - 1))
        self.power = power
        self.steps = 0
        self.progress = 0.0
        self.remaining = max(1, total_steps - self.warmup)  # decay steps left
        self._apply()

    def factor(self) -> float:
        """The multiplier of the base learning rate for the next step."""
        if self.steps < self.warmup:
            return (self.steps + 1) / self.warmup
        return max(0.0, 1.0 - self.progress) ** self.power

    def step(self) -> None:
        if self.steps >= self.warmup and self.remaining > 0:
            # Equal increments that reach 1 exactly after the remaining steps.
            self.progress = 1.0 if self.remaining == 1 else self.progress + (1.0 - self.progress) / self.remaining
            self.remaining -= 1
        self.steps += 1
        self._apply()

    def replan(self, remaining_steps: int) -> None:
        """Decay to zero over ``remaining_steps`` from here (ends any warm-up now)."""
        self.warmup = min(self.warmup, self.steps)
        self.remaining = max(1, remaining_steps)

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * self.factor()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("base_lrs", "warmup", "power", "steps", "progress", "remaining")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


def time_limited_epochs(seconds_per_epoch: Sequence[float], budget_s: float, done: int, planned: int) -> int:
    """How many epochs a run can have in all, given its time budget and the epochs timed so far.

    ``done`` epochs took ``seconds_per_epoch`` (training, validation and saving each). The rest are
    assumed to take the median of the last three, leaving out the first epoch once later ones are
    timed (it carries one-off costs). Returns ``planned`` when they fit.

    Example:
        >>> time_limited_epochs([90, 60, 60], budget_s=400, done=3, planned=12)
        5
    """
    if not math.isfinite(budget_s) or done >= planned:
        return planned
    spent = float(np.sum(seconds_per_epoch))
    if spent >= budget_s:
        return done
    recent = list(seconds_per_epoch[1:] if len(seconds_per_epoch) > 1 else seconds_per_epoch)[-3:]
    fit = int((budget_s - spent) // max(float(np.median(recent)), 1e-9))
    return max(done, min(planned, done + fit))


@torch.no_grad()
def _validate(model, loader, device, amp: str, channels_last: bool, dist_: _Dist, patch=None):
    """Mean per-class Dice over the validation volumes (NaN-aware), reduced over ranks.

    A network trained on patches is run in sliding windows of its patch size, as in prediction.
    """
    from .predict import sliding_window_logits

    model.eval()
    sums = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for image, label in loader:
        image = image.to(device)
        if channels_last:
            image = image.to(memory_format=torch.channels_last_3d)
        with autocast_for(device, amp)[0]:
            logits = sliding_window_logits(model, image, patch) if patch else model(image)
            pred = logits.argmax(1).cpu().numpy()
        for p, t in zip(pred, label.numpy()):
            d = dice_per_class(p, t, NUM_CLASSES)
            ok = ~np.isnan(d)
            sums[ok] += torch.from_numpy(d[ok])
            counts[ok] += 1
    stats = dist_.sum(torch.stack([sums, counts]).to(device if device.type == "cuda" else "cpu")).cpu()
    model.train()
    with np.errstate(invalid="ignore"):
        return (stats[0] / stats[1]).numpy()


def train(cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike = "model",
          resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train a :class:`ResUNet3D` on the pairs found in ``data_dir``.

    Writes to ``out_dir``: ``new_model.pth`` (best validation mean Dice), ``last.pth``
    (every epoch; what ``resume`` continues from) and ``train_log.jsonl`` (one line per epoch).
    Under ``torchrun`` only rank 0 writes.

    Args:
        cfg: settings, e.g. ``preset("cpu")``.
        data_dir: folder of image/label pairs (either HipMRI layout).
        out_dir: where checkpoints and the log go.
        resume: continue from ``out_dir/last.pth``.
        progress: show tqdm progress bars.
        log: where one-line messages go.

    Raises:
        HipsegError: bad data, an existing run in ``out_dir`` without ``resume``, ...
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    dist_ = _Dist(cfg.device)
    try:
        return _train(cfg, data_dir, out, resume, progress, log, dist_, t_start)
    finally:
        dist_.close()


def _train(cfg, data_dir, out, resume, progress, log, dist_: _Dist, t_start) -> TrainResult:
    device = resolve_device(cfg.device)
    if dist_.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    last_path, best_path, log_path = out / LAST_NAME, out / BEST_NAME, out / LOG_NAME

    def check_output():
        if not resume and (last_path.exists() or best_path.exists()):
            raise HipsegError(f"{out}: holds checkpoints of an earlier run; resume it (--resume) "
                              "or choose another output folder")
        if resume and not last_path.exists():
            raise HipsegError(f"{last_path}: nothing to resume (no such checkpoint)")
        _check_writable(out)

    dist_.main_first(check_output, then_others=False)
    seed_everything(cfg.seed + dist_.rank)
    # Data: rank 0 preprocesses into the cache first, then the others read it.
    vols = dist_.main_first(lambda: load_split_volumes(data_dir, cfg, progress=progress and dist_.main))
    if dist_.main:
        for stale in out.glob(".*.tmp") if out.is_dir() else []:
            stale.unlink()  # left by a process killed while writing (the complete file is intact)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HipsegError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    aug = default_augmentation() if cfg.augment else None
    patch = RandomPatch(cfg.patch_shape, cfg.foreground_fraction) if cfg.patch_shape else None
    train_ds = SegmentationDataset(vols["train"], aug, seed=cfg.seed, patch=patch)
    val_ds = SegmentationDataset(vols["val"])
    # One sampler for one or many processes: the same seed gives the same global batches, so a
    # run on N processes matches a single-process run of the same global batch.
    sampler = DistributedSampler(train_ds, num_replicas=dist_.world, rank=dist_.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    val_part = Subset(val_ds, list(range(dist_.rank, len(val_ds), dist_.world)))
    pin = device.type == "cuda"
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=pin,
                     persistent_workers=cfg.num_workers > 0)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(val_part, batch_size=1, num_workers=0)
    if len(train_loader) == 0:
        raise HipsegError(f"{data_dir}: too few training volumes ({len(train_ds)}) for batch size "
                          f"{cfg.batch_size} x {dist_.world} process(es)")

    mcfg = cfg.model_config
    model = ResUNet3D(mcfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    sched = PolySchedule(opt, total_steps, warmup=min(50, total_steps // 10 + 1))
    _, amp_dtype = autocast_for(device, cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = DiceCELoss(NUM_CLASSES).to(device)

    start_epoch, history, best_score, since_best = 0, [], -math.inf, 0
    best_dice = None
    if resume:
        ck = read_checkpoint(last_path)
        saved = ck.get("train_config", {})
        for key in ("target_shape", "base_channels", "depth", "deep_supervision", "downsample", "light_top"):
            mine = list(cfg.target_shape) if key == "target_shape" else getattr(cfg, key)
            if key in saved and saved[key] != mine:
                raise HipsegError(f"{last_path}: was trained with {key}={saved[key]}, not {mine}; "
                                  "resume with the same settings")
        model.load_state_dict(ck["model_state"])
        opt.load_state_dict(ck["optimizer_state"])
        sched.load_state_dict(ck["scheduler_state"])
        if "scaler_state" in ck and ck["scaler_state"]:
            scaler.load_state_dict(ck["scaler_state"])
        start_epoch = int(ck["epoch"]) + 1
        history = list(ck.get("history", []))
        best_score = float(ck.get("best_score", -math.inf))
        since_best = int(ck.get("since_best", 0))
        best_dice = ck.get("best_val_dice")
        if "torch_rng" in ck:
            torch.set_rng_state(ck["torch_rng"])
        if int(ck.get("planned_epochs", cfg.epochs)) != cfg.epochs and start_epoch < cfg.epochs:
            # A run the time limit shortened: carry on to the planned end, decaying over the rest.
            sched.replan((cfg.epochs - start_epoch) * steps_per_epoch)
        if dist_.main:
            log(f"resumed from {last_path} at epoch {start_epoch + 1}")

    net = model
    if dist_.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = None
    if cfg.compile:
        try:
            compiled = torch.compile(net)
        except Exception as exc:
            warnings.warn(f"torch.compile unavailable ({first_line(exc, 200)}); running eager")

    result = TrainResult(best_path=best_path, last_path=last_path)
    if start_epoch >= cfg.epochs:
        result.history, result.stopped_because = history, "already complete"
        return result
    n_params = sum(p.numel() for p in model.parameters())
    if dist_.main:
        amp_name = str(amp_dtype).replace("torch.", "") if amp_dtype else "off"
        log(f"training {n_params / 1e6:.2f} M parameters on {device} x {dist_.world}"
            + (f" ({dist_.backend})" if dist_.enabled else "") + f", amp {amp_name};\n"
            f"{len(train_ds)} train / {len(val_ds)} val volumes at {cfg.target_shape}, batch {cfg.batch_size}")
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    planned = cfg.epochs
    # One bar for the whole run (its ETA is the run's) where someone watches it live; in the
    # executed book (plain progress) the one line per epoch below, with its ETA, says the same.
    bar = None
    if progress and dist_.main and os.environ.get("HIPSEG_PLAIN_PROGRESS") != "1":
        from .progress import progress as tqdm
        bar = tqdm(total=(planned - start_epoch) * steps_per_epoch, unit="step", leave=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    stop = ""
    for epoch in range(start_epoch, cfg.epochs):
        t_wall = time.perf_counter()
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        t_epoch = time.perf_counter()
        data_s = 0.0
        losses = []
        it = iter(train_loader)
        if bar is not None:
            bar.total = (planned - start_epoch) * steps_per_epoch
            bar.set_description(f"epoch {epoch + 1}/{planned}")
        for step in range(steps_per_epoch):
            t0 = time.perf_counter()
            image, label = next(it)
            image = image.to(device, non_blocking=pin)
            label = label.to(device, non_blocking=pin)
            if cfg.channels_last:
                image = image.to(memory_format=torch.channels_last_3d)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            data_s += time.perf_counter() - t0
            with autocast_for(device, cfg.amp)[0]:
                if compiled is not None:
                    try:
                        logits = compiled(image)
                    except Exception as exc:  # compilation happens lazily, at the first call
                        warnings.warn(f"torch.compile failed ({first_line(exc, 200)}); running eager")
                        compiled = None
                        logits = net(image)
                else:
                    logits = net(image)
            loss = loss_fn(logits, label)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_s = time.perf_counter() - t_epoch
        loss_sum = dist_.sum(torch.tensor([float(np.sum(losses)), float(len(losses))],
                                          device=device if device.type == "cuda" else "cpu")).cpu()
        record = {"epoch": epoch + 1, "loss": float(loss_sum[0] / loss_sum[1]),
                  "lr": opt.param_groups[0]["lr"], "epoch_seconds": epoch_s,
                  "step_seconds": epoch_s / steps_per_epoch, "data_fraction": data_s / epoch_s,
                  "steps": steps_per_epoch, "world_size": dist_.world, "steps_all_ranks": int(loss_sum[1])}
        if device.type == "cuda":
            record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        improved = False
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            val = _validate(net, val_loader, device, cfg.amp, cfg.channels_last, dist_, cfg.patch_shape)
            record["val_dice"] = [None if np.isnan(v) else float(v) for v in val]
            score = float(np.nanmean(val[1:])) if np.any(~np.isnan(val[1:])) else -1.0
            record["val_mean_fg_dice"] = score
            if score > best_score:
                best_score, since_best, best_dice, improved = score, 0, record["val_dice"], True
            else:
                since_best += 1
            stop = early_stop_reason(val, since_best, cfg.early_stop_dice, cfg.patience)
        record["wall_seconds"] = time.perf_counter() - t_wall
        history.append(record)
        # The time limit is a safety net: when the epochs timed so far show that the planned ones
        # will not fit, shorten the run and let the learning rate reach zero at its new end.
        walls = [h.get("wall_seconds", h["epoch_seconds"]) for h in history]  # across resumes too
        fits = dist_.min_int(time_limited_epochs(walls, budget_s, epoch + 1, cfg.epochs))  # ranks agree
        if fits != planned:  # shorter, or back towards the plan once epochs turn out faster
            planned = fits
            if epoch + 1 < planned:
                sched.replan((planned - epoch - 1) * steps_per_epoch)
            if dist_.main:
                log(f"WARNING: time limit of {cfg.max_minutes:g} min: at the speed measured so far this "
                    f"machine fits {planned} of {cfg.epochs} epochs; the learning rate now decays to "
                    f"zero over {planned}")
        record["planned_epochs"] = planned
        if not stop and epoch + 1 >= planned and planned < cfg.epochs:
            stop = (f"time limit of {cfg.max_minutes:g} minutes: training stopped after {epoch + 1} of "
                    f"{cfg.epochs} planned epochs")
        if dist_.main:
            extra = dict(train_config=cfg.as_dict(), epoch=epoch, history=history,
                         best_score=best_score, since_best=since_best, best_val_dice=best_dice,
                         optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
                         scaler_state=scaler.state_dict() if scaler.is_enabled() else {},
                         torch_rng=torch.get_rng_state(), metrics=record, planned_epochs=planned,
                         stopped_because=stop)
            save_checkpoint(last_path, model, mcfg, cfg.preprocessing, **extra)
            if improved:
                save_checkpoint(best_path, model, mcfg, cfg.preprocessing, **extra)
            # The log is rewritten from the checkpoint's history, so it never disagrees with it.
            with atomic_path(log_path) as tmp:
                Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history))
            # One line per epoch, within 80 characters (the book's column); the log file has it all.
            dice_txt = " ".join(f"{v:.2f}" if v is not None else "nan" for v in record.get("val_dice", []))
            eta = (planned - epoch - 1) * float(np.mean(walls[-(epoch + 1 - start_epoch):]))
            log(f"epoch {epoch + 1}/{planned} loss {record['loss']:.3f} {record['step_seconds']:.2f} s/step"
                + (f" Dice {dice_txt}" if dice_txt else "") + f" ETA {_clock(eta)}")
        if stop:
            break
    if bar is not None:
        bar.close()
    if not stop:
        stop = f"planned {cfg.epochs} epochs done"
    if dist_.main:
        log(("WARNING: " if planned < cfg.epochs else "") + f"stopped: {stop}")
    result.history, result.stopped_because = history, stop
    result.best_val_dice = best_dice
    result.seconds = time.perf_counter() - t_start
    return result
