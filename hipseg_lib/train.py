"""Training: one step, one epoch, one validation, the learning-rate schedule,
and :func:`fit`, the loop the training chapter runs. The production trainer
(:mod:`~hipseg_lib.trainer`: several processes, resuming, a time limit)
composes the same functions.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import BEST_NAME, LAST_NAME, NUM_CLASSES, HipsegError
from .augment import RandomPatch, augmentation_named, mirrored_axes
from .checkpoint import TorchBackend, save_checkpoint
from .config import TrainConfig
from .data import TrainingBatches, TrainingSet, load_split_volumes
from .loss import DeepSupervisionLoss, DiceCELoss
from .metrics import dice_from_confusion
from .model import ResUNet3D
from .predictor import InferenceSettings, Predictor
from .runtime import (
    autocast,
    memory_layout,
    resolve_precision,
    seed_everything,
)

__all__ = ["make_loss", "training_step", "warmup_steps", "PolySchedule",
           "train_epoch", "validate", "TrainingData", "prepare_data",
           "inference_settings", "NonFiniteLoss", "TrainingRun", "start_run",
           "reached_early_stop", "fit", "epoch_line", "best_record"]


class NonFiniteLoss(HipsegError):
    """The loss became NaN or infinite: the run stops; its checkpoints keep
    the last finite state."""


def make_loss(cfg: TrainConfig) -> DeepSupervisionLoss:
    """Soft Dice plus cross-entropy, on every head of the network."""
    heads = cfg.model.depth - 1 if cfg.model.deep_supervision else 1
    dice_ce = DiceCELoss(NUM_CLASSES, dice_weight=cfg.dice_weight,
                         ce_weight=cfg.ce_weight)
    return DeepSupervisionLoss(dice_ce, heads)


def training_step(network, loss_fn, optimizer, image, label,
                  dtype=None, grad_clip=0.0, scaler=None) -> torch.Tensor:
    """One update of the weights on one batch; returns its loss.

    ``dtype``: the 16-bit type the forward pass computes in (None: fp32);
    ``scaler``: fp16's gradient scaler (bf16 and fp32 need none).
    """
    with autocast(image.device, dtype):
        outputs = network(image)                # 1. forward
    loss = loss_fn(outputs, label)              # 2. the loss, in fp32
    optimizer.zero_grad(set_to_none=True)       # 3. forget old gradients
    if scaler is None:
        loss.backward()                         # 4. backward: gradients
    else:  # fp16: scaled, so that small gradients do not vanish
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    if grad_clip > 0:                           # ... clipped to grad_clip
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()                        # 5. the update
    else:
        scaler.step(optimizer)                  # (skipped if fp16 overflowed)
        scaler.update()
    return loss.detach()


def warmup_steps(total: int) -> int:
    """The learning rate's warm-up: a tenth of the run, at most 50 steps."""
    return min(50, total // 10 + 1)


class PolySchedule:
    """The learning rate: a linear warm-up to the base rate, then a
    polynomial decay (power 0.9) to zero at the run's last step.
    :meth:`replan` changes how many steps remain, so that a run a time limit
    shortens still decays to zero, with no jump.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)
        >>> sched = PolySchedule(opt, total_steps=10, warmup=2)
        >>> for _ in range(10):
        ...     opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"]
        0.0
    """

    def __init__(self, optimizer, total_steps: int, warmup: int,
                 power: float = 0.9):
        self.optimizer, self.power = optimizer, power
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.warmup = max(0, min(warmup, total_steps - 1))
        self.steps = 0          # steps taken
        self.progress = 0.0     # share of the decay done
        self.remaining = max(1, total_steps - self.warmup)  # decay steps left
        self._apply()

    def factor(self) -> float:
        """The base learning rate's multiplier for the next step."""
        if self.steps < self.warmup:
            return (self.steps + 1) / self.warmup
        return max(0.0, 1.0 - self.progress) ** self.power

    def step(self) -> None:
        if self.steps >= self.warmup and self.remaining > 0:
            # equal increments that reach 1 after the remaining steps
            self.progress += (1.0 - self.progress) / self.remaining
            self.remaining -= 1
        self.steps += 1
        self._apply()

    def replan(self, remaining_steps: int) -> None:
        """Decay to zero over ``remaining_steps`` from here."""
        self.warmup = min(self.warmup, self.steps)
        self.remaining = max(1, remaining_steps)

    def rebase(self, total_steps: int) -> None:
        """From the step reached, follow the plan of ``total_steps`` (a run
        resumed with another number of epochs), even after a finished one."""
        decay = max(1, total_steps - self.warmup)
        self.progress = min(1.0, max(0, self.steps - self.warmup) / decay)
        self.remaining = max(1, total_steps - max(self.steps, self.warmup))
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("base_lrs", "warmup", "power",
                                              "steps", "progress", "remaining")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


def train_epoch(step: Callable, batches: TrainingBatches, epoch: int,
                schedule: PolySchedule) -> torch.Tensor:
    """One pass over an epoch's batches: the training step on each, the
    learning rate moved on after each. Returns the losses, left where they
    are (on a GPU, read once after the epoch, not once a step)."""
    losses = []
    for image, label in batches.epoch(epoch):
        losses.append(step(image, label))
        schedule.step()
    return torch.stack(losses).float()


def confusion(pred: torch.Tensor, truth: torch.Tensor,
              num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The confusion matrix ``cm[t, p]`` of two label tensors, counted
    where they are (a GPU's counts stay on it)."""
    k = num_classes
    idx = (truth.long() * k + pred.long()).flatten()
    return torch.bincount(idx, minlength=k * k).reshape(k, k)


def validate(predictor: Predictor,
             volumes: Sequence[tuple[np.ndarray, np.ndarray]],
             loss_fn, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Each validation volume's Dice per class on the network's grid
    (``(volumes, C)``; NaN for a class in neither truth nor prediction) and
    its loss (``(volumes,)``), computed on ``device``: from a GPU, only a
    confusion matrix and a loss per volume come back."""
    if not volumes:  # a process with no share of the validation volumes
        return np.zeros((0, NUM_CLASSES)), np.zeros(0)
    counts, losses = [], []
    for image, label in volumes:
        x = torch.from_numpy(image[None, None]).to(device)
        truth = torch.from_numpy(label[None].astype(np.int64)).to(device)
        logp = predictor.grid_log_probabilities(x)
        counts.append(confusion(logp[0].argmax(0), truth[0]))
        # log-probabilities are logits too: their softmax is the probabilities
        losses.append(loss_fn(logp, truth))
    matrices = torch.stack(counts).cpu().numpy()
    dice = np.array([dice_from_confusion(cm) for cm in matrices])
    return dice, torch.stack(losses).float().cpu().numpy()


@dataclass
class TrainingData:
    """What a run trains and validates on."""

    batches: TrainingBatches
    validation: list[tuple[np.ndarray, np.ndarray]]  # on the network's grid


def prepare_data(cfg: TrainConfig, data_dir, cache_dir, device,
                 rank: int = 0, world: int = 1) -> TrainingData:
    """The volumes of ``data_dir``, preprocessed (cached): the training ones
    as batches (patches and augmentation as ``cfg`` says), the validation
    ones as arrays (each of ``world`` processes takes every world-th)."""
    vols = load_split_volumes(data_dir, cfg, cache_dir)
    patch = None
    if cfg.patch_shape:
        patch = RandomPatch(cfg.patch_shape, cfg.foreground_fraction)
    batches = TrainingBatches(TrainingSet(vols["train"], device),
                              cfg.batch_size, cfg.seed,
                              augmentation_named(cfg.augmentation), patch,
                              rank, world)
    return TrainingData(batches, [v.load() for v in vols["val"][rank::world]])


def inference_settings(cfg: TrainConfig) -> InferenceSettings:
    """How a network of this run predicts: mirrored along the axes its
    training mirrored, in windows of its patch size (if it had patches)."""
    return InferenceSettings(mirror_axes=mirrored_axes(cfg.augmentation),
                             window=cfg.patch_shape)


@dataclass
class TrainingRun:
    """What a run trains with, built once by :func:`start_run`: for
    :func:`fit` and for the production trainer alike."""

    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: PolySchedule
    loss_fn: DeepSupervisionLoss
    dtype: torch.dtype | None       # the 16-bit type, or None for fp32
    scaler: torch.amp.GradScaler | None  # fp16 only
    layout: torch.memory_format     # the batches' layout (the network's)
    predictor: Predictor            # validation: one plain pass


def start_run(cfg: TrainConfig, steps_per_epoch: int, device,
              precision: str = "auto",
              network: torch.nn.Module | None = None) -> TrainingRun:
    """The network (a :class:`~hipseg_lib.model.ResUNet3D` unless one is
    given) on ``device``, Adam, the schedule over the whole run, the loss,
    the arithmetic and the validation predictor."""
    dtype = resolve_precision(device, precision)
    layout = memory_layout(device, dtype)
    network = (network or ResUNet3D(cfg.model)).to(device)
    network.to(memory_format=layout)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(network.parameters(), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    schedule = PolySchedule(optimizer, total, warmup_steps(total))
    scaler = None
    if dtype == torch.float16:
        scaler = torch.amp.GradScaler(torch.device(device).type)
    plain = InferenceSettings(mirror_axes=(), window=cfg.patch_shape)
    # validation as training computes, but never in fp16 (see TorchBackend)
    checked = "fp32" if dtype == torch.float16 else precision
    backend = TorchBackend(network, device, checked)
    return TrainingRun(network, optimizer, schedule, make_loss(cfg), dtype,
                       scaler, layout,
                       Predictor(backend, cfg.preprocessing, plain))


def reached_early_stop(cfg: TrainConfig, val_dice: Sequence) -> bool:
    """The seed project's rule (``cfg.early_stop_dice`` > 0): every organ's
    validation Dice, the background's aside, at the threshold or above; a
    class no volume holds (None or NaN) does not count."""
    organs = [d for d in val_dice[1:] if d is not None and not math.isnan(d)]
    return 0 < cfg.early_stop_dice <= min(organs, default=0.0)


def best_record(history: Sequence[dict]) -> dict:
    """The validated epoch with the best mean foreground Dice (the first,
    on a tie): the one :func:`fit` keeps as its best checkpoint."""
    validated = [r for r in history if "val_dice" in r]
    if not validated:
        raise ValueError("no epoch of this history was validated")
    return max(validated, key=lambda r: np.nanmean(r["val_dice"][1:]))


def fit(cfg: TrainConfig, data: TrainingData, out_dir, device,
        precision: str = "auto", log: Callable[[str], None] = print,
        network: torch.nn.Module | None = None) -> list[dict]:
    """Train a :class:`~hipseg_lib.model.ResUNet3D` (or ``network``) for
    ``cfg.epochs``, keeping the epoch of the best mean validation Dice as
    ``new_model.pth`` and the last as ``last.pth``. Returns one record per
    epoch."""
    seed_everything(cfg.seed)
    run = start_run(cfg, data.batches.steps_per_epoch, device, precision,
                    network)
    network, optimizer = run.network, run.optimizer

    def step(image, label):
        return training_step(network, run.loss_fn, optimizer,
                             image.to(memory_format=run.layout), label,
                             run.dtype, cfg.grad_clip, run.scaler)

    out, best = Path(out_dir), -1.0
    history: list[dict] = []

    def save(name: str, epoch: int) -> None:
        save_checkpoint(out / name, network, cfg.preprocessing,
                        inference_settings(cfg), train_config=cfg.to_dict(),
                        epoch=epoch, history=history)

    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        network.train()
        losses = train_epoch(step, data.batches, epoch,
                             run.schedule).cpu()
        if not torch.isfinite(losses).all():
            raise NonFiniteLoss(f"the loss became {losses.sum().item()} in "
                                f"epoch {epoch + 1}: try a lower lr")
        record = {"epoch": epoch + 1, "loss": losses.mean().item(),
                  "lr": optimizer.param_groups[0]["lr"]}
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.val_every == 0 or last:
            dice, val_losses = validate(run.predictor, data.validation,
                                        run.loss_fn, device)
            with np.errstate(all="ignore"):  # a class no volume has: NaN
                record["val_dice"] = np.nanmean(dice, axis=0).tolist()
            record["val_loss"] = float(val_losses.mean())
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        log(epoch_line(record, cfg.epochs))
        if "val_dice" in record:
            organs = np.array(record["val_dice"][1:])  # the foreground
            if np.nanmean(organs) > best:  # the best epoch so far: keep it
                best = float(np.nanmean(organs))
                save(BEST_NAME, epoch)
            if reached_early_stop(cfg, record["val_dice"]):
                last = True  # the seed project's rule: every organ passed
        if last:
            save(LAST_NAME, epoch)
            break
    return history


def epoch_line(record: dict, epochs: int) -> str:
    """One line about an epoch, within 80 characters (a class no validation
    volume holds, NaN or, in a JSON log, None, prints as nan)."""
    line = (f"epoch {record['epoch']}/{epochs} loss {record['loss']:.3f} "
            f"{record['seconds']:.0f} s")
    if "val_dice" in record:
        dice = " ".join("nan" if d is None or math.isnan(d) else f"{d:.2f}"
                        for d in record["val_dice"][1:])
        line += f" | val loss {record['val_loss']:.3f} Dice {dice}"
    return line
