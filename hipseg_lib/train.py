"""Training: one optimisation step (:class:`TrainingStep`), and the run around it (:class:`Trainer`):
the data, the network and its optimiser built in the constructor, then per epoch
:meth:`Trainer.train_epoch`, :meth:`Trainer.validate`, saving; the learning-rate schedule, stopping
rules, the time limit, resume. The settings live in :mod:`~hipseg_lib.config`, the run folder in
:mod:`~hipseg_lib.runs`, the device, precision and processes in :mod:`~hipseg_lib.runtime`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import BEST_NAME, LAST_NAME, NUM_CLASSES, HipsegError
from .augment import RandomPatch, augmentation_named
from .checkpoint import read_checkpoint, save_checkpoint
from .config import TrainConfig
from .cpu_kernels import use_cpu_kernels
from .data import SegmentationDataset, TrainingBatches, TrainingSet, load_split_volumes, with_planned_spacing
from .loss import DiceCELoss
from .metrics import dice_per_class
from .model import ModelConfig, ResUNet3D
from .preprocess import Preprocessing
from .runs import check_run_folder, prepare_run_folder, write_log
from .runtime import Autocast, CompiledOrEager, Dist, Launch, autocast_for, resolve_device, seed_everything

__all__ = ["train", "Trainer", "RunState", "TrainingData", "TrainResult", "TrainingStep", "NonFiniteLoss",
           "PolySchedule", "time_limited_epochs", "early_stop_reason"]


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 holds the full picture)."""

    history: list[dict] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None
    stopped_because: str = ""
    best_val_dice: list[float] | None = None
    seconds: float = 0.0


class NonFiniteLoss(HipsegError):
    """The training loss became NaN or infinite: the run stops, its checkpoints keep the last finite state."""


@dataclass
class TrainingStep:
    """One optimisation step on one batch: what :func:`train` runs for every batch.

    Args:
        network: maps images ``(N, 1, X, Y, Z)`` to class scores ``(N, C, X, Y, Z)`` (the network, or
            its compiled or DistributedDataParallel wrapper).
        loss_fn: e.g. :class:`~hipseg_lib.loss.DiceCELoss`.
        optimizer: holds the parameters it updates (e.g. Adam).
        precision: the forward pass's autocast (:func:`~hipseg_lib.runtime.autocast_for`); fp32 by default.
        grad_clip: the largest gradient norm allowed (0: no clipping).
        scaler: fp16's gradient scaler (None: none; bf16 and fp32 need none).

    Example:
        >>> net = torch.nn.Conv3d(1, 2, 1)
        >>> step = TrainingStep(net, torch.nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.1))
        >>> loss = step(torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long))
        >>> loss.shape
        torch.Size([])
    """

    network: Callable[[torch.Tensor], torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    precision: Autocast = field(default_factory=lambda: autocast_for(torch.device("cpu"), "off"))
    grad_clip: float = 0.0
    scaler: torch.amp.GradScaler | None = None

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Update the parameters once; returns the batch's loss (on the device, not read back)."""
        with self.precision.context:
            logits = self.network(image)             # forward: class scores per voxel
        loss = self.loss_fn(logits, label)           # Dice + cross-entropy, computed in fp32
        self.optimizer.zero_grad(set_to_none=True)   # forget the previous step's gradients
        if self.scaler is None:
            loss.backward()                          # backward: the gradient of every weight
        else:
            self.scaler.scale(loss).backward()       # fp16: scaled, so small gradients survive
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:                       # shorten a too-long gradient vector
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()                    # Adam moves every weight
        else:
            self.scaler.step(self.optimizer)         # (skipped when fp16 overflowed)
            self.scaler.update()
        return loss.detach()


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
        6
    """
    if not math.isfinite(budget_s) or done >= planned:
        return planned
    spent = float(np.sum(seconds_per_epoch))
    if spent >= budget_s:
        return done
    recent = list(seconds_per_epoch[1:] if len(seconds_per_epoch) > 1 else seconds_per_epoch)[-3:]
    fit = int((budget_s - spent) // max(float(np.median(recent)), 1e-9))
    return max(done, min(planned, done + fit))


@dataclass
class RunState:
    """What a run carries from epoch to epoch and keeps in ``last.pth`` to resume from."""

    start_epoch: int = 0
    planned: int = 0  # the epochs the run now plans (fewer when the time limit shortened it)
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    since_best: int = 0
    best_dice: list | None = None

    def walls(self) -> list[float]:
        """Seconds each epoch of the run took in all (training, validation, saving), across resumes."""
        return [h.get("wall_seconds", h["epoch_seconds"]) for h in self.history]


@dataclass(frozen=True)
class TrainingData:
    """The run's data: the training batches, the validation loader and a line about where they live."""

    batches: TrainingBatches
    validation: DataLoader
    n_train: int
    n_val: int
    note: str


class Trainer:
    """A training run that builds itself: the data, the network, Adam, the learning-rate schedule,
    the fp16 scaler and the loss, restored from ``last.pth`` when resuming; :meth:`fit` then runs it.

    One code path serves the training chapter, ``hipseg train`` and ``torchrun -m hipseg_lib train``
    (DistributedDataParallel: NCCL on GPUs, gloo on CPUs). Under torchrun only rank 0 writes.

    Args:
        cfg: settings, e.g. ``make_config("cpu")``.
        data_dir: folder of image/label pairs (either HipMRI layout).
        out_dir: where ``new_model.pth`` (best validation mean Dice), ``last.pth`` (what a resume
            continues from) and ``train_log.jsonl`` (one line per epoch) go.
        resume: continue from ``out_dir/last.pth``.
        progress: show progress bars (when someone watches; the executed book prints one line per epoch).
        log: where one-line messages go.
        launch: how this process was started (default: read from the environment).

    Raises:
        HipsegError: bad data, an existing run in ``out_dir`` without ``resume``, ...
    """

    def __init__(self, cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike = "model",
                 resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                 launch: Launch | None = None):
        self.started = time.perf_counter()
        launch = launch or Launch.from_environment()
        self.dist = Dist(cfg.device, launch)
        try:
            self._build(cfg, data_dir, Path(out_dir), resume, progress, log, launch)
        except BaseException:
            self.dist.close()
            raise

    def _build(self, cfg, data_dir, out: Path, resume: bool, progress: bool, log, launch: Launch) -> None:
        self.out, self.progress, self.log = out, progress, log
        self.device = resolve_device(cfg.device, launch.local_rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the shapes are fixed: let cuDNN pick its fastest kernels
        self.dist.main_first(lambda: check_run_folder(out, resume), then_others=False)
        seed_everything(cfg.seed + self.dist.rank)
        # resample="spacing": the grid's voxel size is planned from the training scans (stored in checkpoints)
        self.cfg = cfg = self.dist.main_first(lambda: with_planned_spacing(cfg, data_dir))
        self.data = self._load_data(data_dir)
        self.network = ResUNet3D(cfg.model).to(self.device)
        if self.device.type == "cpu":
            use_cpu_kernels(self.network)  # the same layers, faster kernels (cpu_kernels.py)
        if cfg.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # in place
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * self.data.batches.steps_per_epoch
        self.schedule = PolySchedule(self.optimizer, total, warmup=min(50, total // 10 + 1))
        self.precision = autocast_for(self.device, cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.dtype == torch.float16)
        self.state = RunState(planned=cfg.epochs)
        if resume:
            self._restore()
        forward: torch.nn.Module = self.network
        if self.dist.enabled:
            forward = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = TrainingStep(CompiledOrEager(forward, cfg.compile, agree=self.dist.min_int),
                                 DiceCELoss(NUM_CLASSES, dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight)
                                 .to(self.device), self.optimizer, self.precision, cfg.grad_clip,
                                 self.scaler if self.scaler.is_enabled() else None)

    def _load_data(self, data_dir) -> TrainingData:
        """Preprocess (rank 0 fills the cache first), then the training batches and the validation loader.

        The training volumes live on the training device when they fit (``data_on``), and each batch
        is augmented there: no worker processes, so nothing a worker holds can go stale between
        epochs. One order for one or many processes: the same seed gives the same global batches, so
        a run on N processes matches a single-process run of the same global batch.
        """
        cfg, dist_ = self.cfg, self.dist
        vols = dist_.main_first(lambda: load_split_volumes(data_dir, cfg, progress=self.progress and dist_.main))
        if dist_.main:
            prepare_run_folder(self.out)
        aug = augmentation_named(cfg.augmentation) if cfg.augment else None
        patch = RandomPatch(cfg.patch_shape, cfg.foreground_fraction) if cfg.patch_shape else None
        train_set = TrainingSet(vols["train"], self.device, cfg.data_on)
        batches = TrainingBatches(train_set, cfg.batch_size, cfg.seed, aug, patch, dist_.rank, dist_.world)
        if batches.steps_per_epoch == 0:
            raise HipsegError(f"{data_dir}: too few training volumes ({len(train_set)}) for batch size "
                              f"{cfg.batch_size} x {dist_.world} process(es)")
        val_ds = SegmentationDataset(vols["val"])
        val_part = Subset(val_ds, list(range(dist_.rank, len(val_ds), dist_.world)))
        loader = DataLoader(val_part, batch_size=1, num_workers=0, pin_memory=self.device.type == "cuda")
        note = (f"training volumes on the {train_set.where} ({train_set.nbytes / 2**20:.1f} MiB), "
                f"augmented on {self.device.type}")
        return TrainingData(batches, loader, len(train_set), len(val_ds), note)

    def _restore(self) -> None:
        """Continue from ``last.pth``: weights, optimiser, schedule, history, best score, random states.

        The network and the preprocessing must be the ones the run was started with.
        """
        path, cfg = self.out / LAST_NAME, self.cfg
        ck = read_checkpoint(path)
        for name, saved, mine in (("network", ModelConfig.from_dict(ck["model_config"]), cfg.model),
                                  ("preprocessing", Preprocessing.from_dict(ck["preprocessing"]), cfg.preprocessing)):
            diff = {k: v for k, v in saved.to_dict().items() if mine.to_dict()[k] != v}
            if diff:
                k = sorted(diff)[0]
                raise HipsegError(f"{path}: was trained with {k}={diff[k]}, not {mine.to_dict()[k]} ({name} "
                                  "settings differ); resume with the same settings")
        self.network.load_state_dict(ck["model_state"])
        self.optimizer.load_state_dict(ck["optimizer_state"])
        self.schedule.load_state_dict(ck["scheduler_state"])
        if ck.get("scaler_state"):
            self.scaler.load_state_dict(ck["scaler_state"])
        self.state = RunState(start_epoch=int(ck["epoch"]) + 1, planned=cfg.epochs, history=list(ck.get("history", [])),
                              best_score=float(ck.get("best_score", -math.inf)),
                              since_best=int(ck.get("since_best", 0)), best_dice=ck.get("best_val_dice"))
        self._restore_rng(ck)
        start = self.state.start_epoch
        if int(ck.get("planned_epochs", cfg.epochs)) != cfg.epochs and start < cfg.epochs:
            # A run the time limit shortened: carry on to the planned end, decaying over the rest.
            self.schedule.replan((cfg.epochs - start) * self.data.batches.steps_per_epoch)
        self.say(f"resumed from {path} at epoch {start + 1}")

    def _restore_rng(self, ck: dict) -> None:
        """Each process takes back its own random state (CPU, and CUDA on a GPU) from the checkpoint."""
        states = ck.get("rng_states") or ([{"cpu": ck["torch_rng"], "cuda": None}] if "torch_rng" in ck else [])
        if len(states) != self.dist.world:
            self.say(f"WARNING: the checkpoint holds the random states of {len(states)} process(es), this run "
                     f"has {self.dist.world}: dropout and other random draws will not repeat the interrupted run")
            return
        mine = states[self.dist.rank]
        torch.set_rng_state(mine["cpu"])
        if mine.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def say(self, message: str) -> None:
        """``message`` to the log, from rank 0 only."""
        if self.dist.main:
            self.log(message)

    def fit(self) -> TrainResult:
        """Train the planned epochs (or what the time limit and the stopping rules leave of them)."""
        try:
            result = TrainResult(best_path=self.out / BEST_NAME, last_path=self.out / LAST_NAME)
            if self.state.start_epoch >= self.cfg.epochs:
                result.history, result.stopped_because = self.state.history, "already complete"
                return result
            self._announce()
            stop = self.epochs()
            result.history, result.stopped_because = self.state.history, stop
            if not (self.out / BEST_NAME).exists():  # no validation happened: say so, name no file
                result.best_path = None
            result.best_val_dice = self.state.best_dice
            result.seconds = time.perf_counter() - self.started
            return result
        finally:
            self.dist.close()

    def _announce(self) -> None:
        cfg, dist_, data = self.cfg, self.dist, self.data
        n_params = sum(p.numel() for p in self.network.parameters())
        amp = self.precision.name if self.precision.dtype else "off"
        self.say(f"training {n_params / 1e6:.2f} M parameters on {self.device} x {dist_.world}"
                 + (f" ({dist_.backend})" if dist_.enabled else "") + f", amp {amp};\n"
                 f"{data.n_train} train / {data.n_val} val volumes at {cfg.preprocessing.target_shape}, "
                 f"batch {cfg.batch_size};\n{data.note}")

    def epochs(self) -> str:
        """The epochs from where the run stands: train, validate, re-plan for the time limit, save, log.
        Returns why the run stopped. The run's last epoch is always validated, however it ends (as
        planned, shortened by the time limit, or by a stopping rule), so its best checkpoint exists."""
        cfg, state, steps = self.cfg, self.state, self.data.batches.steps_per_epoch
        bar = None
        if self.progress and self.dist.main:  # one bar for the whole run: its ETA is the run's
            from .progress import progress as tqdm
            bar = tqdm(total=(state.planned - state.start_epoch) * steps, unit="step", leave=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.network.train()
        stop = ""
        for epoch in range(state.start_epoch, cfg.epochs):
            t_wall = time.perf_counter()
            if bar is not None:
                bar.total = (state.planned - state.start_epoch) * steps
                bar.set_description(f"epoch {epoch + 1}/{state.planned}")
            record = {"epoch": epoch + 1, **self.train_epoch(epoch, bar)}
            validated = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
            improved = False
            if validated:
                improved, stop = self._score(record, self.validate())
            record["wall_seconds"] = time.perf_counter() - t_wall
            state.history.append(record)
            limit = self._replan(epoch)
            if limit and not validated:  # the shortened run ends here: its last weights are a candidate
                improved, _ = self._score(record, self.validate())
                validated = True
                record["wall_seconds"] = time.perf_counter() - t_wall
            stop = stop or limit
            record["planned_epochs"] = state.planned
            self._check_weights(epoch)
            write_last = validated or bool(stop) or cfg.save_every_epoch
            rng_states = self.dist.gather(_rng_state(self.device)) if write_last else None  # every rank's
            if self.dist.main:
                self._save(record, improved, stop, rng_states)
                self._log_epoch(epoch, record)
            if stop:
                break
        if bar is not None:
            bar.close()
        if not stop:
            stop = f"planned {cfg.epochs} epochs done"
        self.say(("WARNING: " if state.planned < cfg.epochs else "") + f"stopped: {stop}")
        return stop

    def train_epoch(self, epoch: int, bar=None) -> dict:
        """One pass over the epoch's training batches, the training step on
        each; returns the epoch's record.

        The losses stay on the device and are read once, at the end of the
        epoch (no host synchronisation per step). A NaN or infinite loss on
        any process stops the run with :class:`NonFiniteLoss`, before
        anything is saved. ``data_fraction`` is the share of the epoch spent
        drawing and augmenting batches (timed with CUDA events on a GPU).
        """
        device, n = self.device, self.data.batches.steps_per_epoch
        timer = _Timer(device)
        losses = torch.zeros(n, dtype=torch.float32, device=device)
        batches = self.data.batches.epoch(epoch)
        for k in range(n):
            mark = timer.mark()
            image, label = next(batches)
            if self.cfg.channels_last:
                image = image.to(memory_format=torch.channels_last_3d)
            timer.data_done(mark)
            # forward, loss, backward, clipping, update
            losses[k] = self.step(image, label)
            self.schedule.step()
            if bar is not None:
                bar.update(1)
                if k % 20 == 19 or k == n - 1:  # a read for the bar only
                    recent = losses[max(0, k - 9):k + 1].mean().item()
                    bar.set_postfix(loss=f"{recent:.3f}")
        epoch_s, data_s = timer.finish()
        # every rank sees every rank's losses
        per_step = self.dist.sum(losses.to(self._reduce_device))
        bad = (~torch.isfinite(per_step)).nonzero()
        if len(bad):
            step = int(bad[0])
            raise NonFiniteLoss(
                f"the training loss became {per_step[step].item()} at epoch "
                f"{epoch + 1}, step {step + 1} of {n}; stopped, and the "
                "checkpoints saved so far keep the last finite state (a lower "
                "lr, grad_clip > 0 or amp=off may help)")
        world = self.dist.world
        record = {"loss": float(per_step.sum()) / world / n,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "epoch_seconds": epoch_s, "step_seconds": epoch_s / n,
                  "data_fraction": data_s / epoch_s, "steps": n,
                  "world_size": world, "steps_all_ranks": n * world}
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            record["peak_gpu_memory_gb"] = peak / 2**30
        return record

    @property
    def _reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def validate(self) -> np.ndarray:
        """Mean per-class Dice over the validation volumes (NaN-aware), reduced over ranks.

        Each volume is segmented on its training grid by the predictor pipeline that ``hipseg predict``
        runs (a network trained on patches in windows of its patch size), with its precision setting.
        """
        from .predict import TorchBackend
        from .predictor import InferenceSettings, Predictor

        settings = InferenceSettings(tta=False, postprocess=False, window=self.cfg.patch_shape, memory_bytes=1 << 62)
        predictor = Predictor(TorchBackend(self.network, self.device), self.cfg.preprocessing, settings)
        sums = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        for image, label in self.data.validation:
            pred = predictor.grid_log_probabilities(image.numpy()).argmax(1)
            for p, t in zip(pred, label.numpy()):
                d = dice_per_class(p, t, NUM_CLASSES)
                ok = ~np.isnan(d)
                sums[ok] += torch.from_numpy(d[ok])
                counts[ok] += 1
        stats = self.dist.sum(torch.stack([sums, counts]).to(self._reduce_device)).cpu()
        with np.errstate(invalid="ignore"):
            return (stats[0] / stats[1]).numpy()

    def _score(self, record: dict, val: np.ndarray) -> tuple[bool, str]:
        """Record a validation; returns (better than the best so far, why to stop or "")."""
        state = self.state
        record["val_dice"] = [None if np.isnan(v) else float(v) for v in val]
        score = float(np.nanmean(val[1:])) if np.any(~np.isnan(val[1:])) else -1.0
        record["val_mean_fg_dice"] = score
        improved = score > state.best_score
        if improved:
            state.best_score, state.since_best, state.best_dice = score, 0, record["val_dice"]
        else:
            state.since_best += 1
        return improved, early_stop_reason(val, state.since_best, self.cfg.early_stop_dice, self.cfg.patience)

    def _replan(self, epoch: int) -> str:
        """The time limit is a safety net: when the epochs timed so far show that the planned ones will
        not fit, shorten the run and let the learning rate reach zero at its new end. Returns the stop
        reason when this epoch is the (shortened) run's last."""
        cfg, state = self.cfg, self.state
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
        fits = self.dist.min_int(time_limited_epochs(state.walls(), budget_s, epoch + 1, cfg.epochs))  # ranks agree
        if fits != state.planned:  # shorter, or back towards the plan once epochs turn out faster
            state.planned = fits
            if epoch + 1 < fits:
                self.schedule.replan((fits - epoch - 1) * self.data.batches.steps_per_epoch)
            self.say(f"WARNING: time limit of {cfg.max_minutes:g} min: at the speed measured so far this "
                     f"machine fits {fits} of {cfg.epochs} epochs; the learning rate now decays to "
                     f"zero over {fits}")
        if epoch + 1 >= state.planned and state.planned < cfg.epochs:
            return (f"time limit of {cfg.max_minutes:g} minutes: training stopped after {epoch + 1} of "
                    f"{cfg.epochs} planned epochs")
        return ""

    def _check_weights(self, epoch: int) -> None:
        """Stop with :class:`NonFiniteLoss` when a weight is NaN or infinite (every rank holds the same
        weights, so every rank stops), before anything is saved."""
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.network.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLoss(f"the weights became NaN or infinite in epoch {epoch + 1}; stopped, and the "
                                "checkpoints saved so far keep the last finite state (a lower lr or "
                                "grad_clip > 0 may help)")

    def _save(self, record: dict, improved: bool, stop: str, rng_states: list | None) -> None:
        """``new_model.pth`` when validation improved; ``last.pth`` when ``rng_states`` are given (at
        validation epochs, at the stop, or every epoch with ``save_every_epoch``); the log every epoch."""
        cfg, state = self.cfg, self.state
        extra = dict(train_config=cfg.to_dict(), epoch=record["epoch"] - 1, history=state.history,
                     best_score=state.best_score, since_best=state.since_best, best_val_dice=state.best_dice,
                     optimizer_state=self.optimizer.state_dict(), scheduler_state=self.schedule.state_dict(),
                     scaler_state=self.scaler.state_dict() if self.scaler.is_enabled() else {},
                     rng_states=rng_states, metrics=record, planned_epochs=state.planned, stopped_because=stop)
        if rng_states is not None:
            save_checkpoint(self.out / LAST_NAME, self.network, cfg.model, cfg.preprocessing, **extra)
        if improved:
            save_checkpoint(self.out / BEST_NAME, self.network, cfg.model, cfg.preprocessing, **extra)
        write_log(self.out, state.history)

    def _log_epoch(self, epoch: int, record: dict) -> None:
        """One line per epoch, within 80 characters (the book's column); the log file has it all."""
        state = self.state
        dice_txt = " ".join(f"{v:.2f}" if v is not None else "nan" for v in record.get("val_dice", []))
        walls = state.walls()
        eta = (state.planned - epoch - 1) * float(np.mean(walls[-(epoch + 1 - state.start_epoch):]))
        self.log(f"epoch {epoch + 1}/{state.planned} loss {record['loss']:.3f} {record['step_seconds']:.2f} s/step"
                 + (f" Dice {dice_txt}" if dice_txt else "") + f" ETA {_clock(eta)}")


def train(cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike = "model",
          resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train a :class:`ResUNet3D` on the pairs found in ``data_dir``: ``Trainer(...).fit()`` (see
    :class:`Trainer` for the arguments and what the run writes).

    Example:
        >>> result = train(make_config("smoke"), "data/synthetic", "model")   # doctest: +SKIP
        >>> result.best_path, result.stopped_because                          # doctest: +SKIP
    """
    return Trainer(cfg, data_dir, out_dir, resume, progress, log).fit()


class _Timer:
    """An epoch's wall time and the part of it spent drawing batches: ``perf_counter`` on a CPU, CUDA
    events on a GPU (recorded in the stream, read once at :meth:`finish`: no synchronisation per step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.pairs: list = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def data_done(self, mark) -> None:
        if not self.cuda:
            self.data_s += time.perf_counter() - mark
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.pairs.append((mark, event))

    def finish(self) -> tuple[float, float]:
        """(seconds of the epoch, seconds drawing batches)."""
        if self.cuda:
            torch.cuda.synchronize()
            self.data_s = sum(a.elapsed_time(b) for a, b in self.pairs) / 1000
        return time.perf_counter() - self.start, self.data_s


def _rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU's and, on a GPU, the CUDA generator's (dropout draws there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


