"""The production trainer behind ``hipseg train``: the core's step, epoch, validation and schedule
(:mod:`~hipseg_lib.train`), plus what a long run needs and a chapter does not: several processes
(torchrun), resuming from ``last.pth``, a time limit, fp16's gradient scaler, compilation, a
training log and progress bars.

With one process and no time limit it trains the same model as :func:`~hipseg_lib.train.fit`
(a test checks that the weights are equal).
"""
from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import BEST_NAME, LAST_NAME, HipsegError
from .checkpoint import read_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import CompiledOrEager, Dist, Launch
from .runs import check_run_folder, prepare_run_folder, write_log
from .runtime import cuda_unusable_reason, precision_name, resolve_device, seed_everything
from .train import (
    NonFiniteLoss,
    epoch_line,
    inference_settings,
    prepare_data,
    reached_early_stop,
    start_run,
    train_epoch,
    training_step,
    validate,
)

__all__ = ["RunOptions", "Trainer", "TrainResult", "time_limited_epochs", "mean_over_volumes",
           "RESUMABLE_CHANGES"]

# The settings a resumed run may change: how long it runs and how often it validates. Any other
# change (the learning rate, the batch, the augmentation...) would make the checkpoint misreport
# how its weights were trained.
RESUMABLE_CHANGES = ("epochs", "val_every", "early_stop_dice")


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run happens; not part of the experiment (not stored as its settings).

    Args:
        cache_dir: the preprocessing cache.
        device: ``"auto"`` (this process's GPU when there is one), ``"cpu"``, ``"cuda:1"``, ...
        precision: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"`` (:mod:`~hipseg_lib.runtime`).
        compile: wrap the network in ``torch.compile`` (eager if compiling fails).
        max_minutes: a safety net on the run's time (0: none): when the epochs timed so far show
            that the planned ones will not fit, the run is shortened and the learning rate decays
            to zero over what fits; the log says so.
        save_every_epoch: write ``last.pth`` after every epoch (else after each validation).
    """

    cache_dir: str | os.PathLike
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    max_minutes: float = 0.0
    save_every_epoch: bool = False


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (rank 0 holds the full picture)."""

    history: list[dict] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None
    stopped_because: str = ""
    best_val_dice: list[float] | None = None
    seconds: float = 0.0


def time_limited_epochs(seconds_per_epoch: Sequence[float], budget_s: float, done: int, planned: int) -> int:
    """How many epochs a run can have in all, given its time budget and the epochs timed so far.

    The rest are assumed to take the median of the last three (the first left out once later ones
    are timed: it carries one-off costs). Returns ``planned`` when they fit.

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


def mean_over_volumes(rows: Sequence[Sequence[float]]) -> list[float | None]:
    """The mean per class of per-volume Dice rows, NaN-aware; None where no volume has the class."""
    table = np.asarray(rows, dtype=float)
    with np.errstate(all="ignore"):
        means = np.nanmean(table, axis=0)
    return [None if math.isnan(m) else float(m) for m in means]


class Trainer:
    """A training run that builds itself (data, network, optimiser, schedule), resuming from
    ``out_dir/last.pth`` when asked; :meth:`fit` runs it. Under torchrun each process trains on
    its share of every batch (DistributedDataParallel) and rank 0 writes.

    Args:
        cfg: the experiment, e.g. ``make_config("cpu")``.
        data_dir: folder of image/label pairs (either HipMRI layout).
        out_dir: where ``new_model.pth`` (best validation), ``last.pth`` and ``train_log.jsonl`` go.
        options: where and how it runs (:class:`RunOptions`).
        resume: continue from ``out_dir/last.pth``.
        progress: a progress bar for the whole run.
        log: where one-line messages go.
        launch: how this process was started (default: read from the environment).
    """

    def __init__(self, cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 options: RunOptions, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, launch: Launch | None = None):
        self.started = time.perf_counter()
        launch = launch or Launch.from_environment()
        self.dist = Dist(options.device, launch)
        try:
            self._build(cfg, data_dir, Path(out_dir), options, resume, progress, log, launch)
        except BaseException:
            self.dist.close()
            raise

    def _build(self, cfg, data_dir, out: Path, options: RunOptions, resume: bool, progress: bool,
               log, launch: Launch) -> None:
        self.out, self.options, self.progress, self.log = out, options, progress, log
        dist_ = self.dist
        self.device = resolve_device(options.device, launch.local_rank)
        if cfg.preset == "full" and self.device.type == "cpu" and options.device == "auto":
            raise HipsegError(f"preset 'full' is made for a CUDA GPU, and {cuda_unusable_reason()}: "
                              "choose --preset cpu, or --device cpu to train 'full' on the CPU anyway")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        dist_.main_first(lambda: check_run_folder(out, resume), then_others=False)
        self.cfg = cfg
        self.data = dist_.main_first(lambda: prepare_data(cfg, data_dir, options.cache_dir, self.device,
                                                          dist_.rank, dist_.world))
        if dist_.main:
            prepare_run_folder(out)
        seed_everything(cfg.seed + dist_.rank)  # as fit() does, before the weights are drawn
        run = start_run(cfg, self.data.batches.steps_per_epoch, self.device, options.precision)
        self.network, self.optimizer, self.schedule = run.network, run.optimizer, run.schedule
        self.loss_fn, self.dtype, self.scaler = run.loss_fn, run.dtype, run.scaler
        self.predictor, layout = run.predictor, run.layout
        self.state = RunState(planned=cfg.epochs)
        if resume:
            self._restore()
        forward: torch.nn.Module = self.network
        if dist_.enabled:
            forward = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        compiled = CompiledOrEager(forward, options.compile, agree=dist_.min_int)
        step = partial(training_step, compiled, self.loss_fn, self.optimizer, dtype=self.dtype,
                       grad_clip=cfg.grad_clip, scaler=self.scaler)
        self.step = lambda image, label: step(image.to(memory_format=layout), label)
        self.stop_signal: str = ""

    def _restore(self) -> None:
        """Continue from ``last.pth``: weights, optimiser, schedule, history, best score, random states."""
        path, cfg = self.out / LAST_NAME, self.cfg
        ck = read_checkpoint(path)
        if "optimizer_state" not in ck:
            raise HipsegError(f"{path}: written by fit (the chapters' loop), which keeps no optimiser state: "
                              "it predicts, but cannot be resumed; resume a folder that hipseg train wrote")
        theirs = TrainConfig.from_dict(ck["train_config"]).flat_dict()
        mine = TrainConfig.from_dict(cfg.to_dict()).flat_dict()  # the same JSON round trip
        diff = sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k))
        if diff:
            raise HipsegError(f"{path}: was trained with {diff[0]}={theirs.get(diff[0])}, not {mine[diff[0]]}; "
                              f"resume with the same settings (only {', '.join(RESUMABLE_CHANGES)} may change)")
        if int(ck["world_size"]) != self.dist.world:  # each process takes batch_size: the steps differ
            raise HipsegError(f"{path}: was trained by {ck['world_size']} process(es), this run has "
                              f"{self.dist.world}; the batches and the learning-rate schedule depend on it: "
                              "resume with as many")
        self.network.load_state_dict(ck["model_state"])
        self.optimizer.load_state_dict(ck["optimizer_state"])
        self.schedule.load_state_dict(ck["scheduler_state"])
        if self.scaler is not None and ck.get("scaler_state"):
            self.scaler.load_state_dict(ck["scaler_state"])
        self.state = RunState(start_epoch=int(ck["epoch"]) + 1, planned=cfg.epochs,
                              history=list(ck["history"]), best_score=float(ck["best_score"]),
                              best_dice=ck.get("best_val_dice"))
        mine_rng = ck["rng_states"][self.dist.rank]
        torch.set_rng_state(mine_rng["cpu"])
        if mine_rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine_rng["cuda"], self.device)
        start = self.state.start_epoch
        if int(ck.get("planned_epochs", cfg.epochs)) != cfg.epochs and start < cfg.epochs:
            self.schedule.rebase(cfg.epochs * self.data.batches.steps_per_epoch)
        self.say(f"resumed from {path} at epoch {start + 1}")

    def say(self, message: str) -> None:
        """``message`` to the log, from rank 0 only."""
        if self.dist.main:
            self.log(message)

    def fit(self) -> TrainResult:
        """Train the planned epochs (or what the time limit and the stopping rule leave of them)."""
        try:
            result = TrainResult(best_path=self.out / BEST_NAME, last_path=self.out / LAST_NAME)
            if self.state.start_epoch >= self.cfg.epochs:
                result.history, result.stopped_because = self.state.history, "already complete"
                return result
            self._announce()
            with _SignalsStop(self):
                result.stopped_because = self.epochs()
            result.history = self.state.history
            if not (self.out / BEST_NAME).exists():
                result.best_path = None
            result.best_val_dice = self.state.best_dice
            result.seconds = time.perf_counter() - self.started
            return result
        finally:
            self.dist.close()

    def _announce(self) -> None:
        n_params = sum(p.numel() for p in self.network.parameters())
        group = f" ({self.dist.backend})" if self.dist.enabled else ""
        self.say(f"training {n_params / 1e6:.2f} M parameters on {self.device} x {self.dist.world}{group}, "
                 f"{precision_name(self.dtype)}; {len(self.data.batches.train_set)} training volumes, batch "
                 f"{self.cfg.batch_size}, grid {self.cfg.preprocessing.target_shape}")

    def epochs(self) -> str:
        """The epochs from where the run stands; returns why it stopped. The
        run's last epoch is always validated, however it ends, so that its
        best checkpoint exists."""
        cfg, state = self.cfg, self.state
        steps = self.data.batches.steps_per_epoch
        bar = self._bar((state.planned - state.start_epoch) * steps)
        stop = ""
        for epoch in range(state.start_epoch, cfg.epochs):
            t = time.perf_counter()
            self.network.train()
            losses = train_epoch(self.step, self.data.batches, epoch,
                                 self.schedule)
            losses = self.dist.sum(losses) / self.dist.world  # every rank's
            record = self._epoch_record(epoch, losses.cpu(),
                                        time.perf_counter() - t)
            validated = (epoch + 1) % cfg.val_every == 0 \
                or epoch + 1 == cfg.epochs
            if validated:
                stop = self._validate(record)
            record["wall_seconds"] = time.perf_counter() - t
            state.history.append(record)
            limit = self._replan(epoch)  # the time limit
            signalled = self._agreed_signal()
            if (limit or signalled) and not validated:  # a run's last epoch
                stop = self._validate(record) or stop
                validated = True
            stop = stop or limit or signalled
            record["planned_epochs"] = state.planned
            self._check_weights(epoch)
            write_last = validated or bool(stop) or \
                self.options.save_every_epoch
            self._save(record, write_last, bool(stop))
            if bar is not None:
                bar.update(steps)
            if stop:
                break
        if bar is not None:
            bar.close()
        stop = stop or f"planned {cfg.epochs} epochs done"
        warn = "WARNING: " if state.planned < cfg.epochs else ""
        self.say(f"{warn}stopped: {stop}")
        return stop

    def _agreed_signal(self) -> str:
        """Why to stop for a signal, the same on every process: a signal that reached any one of
        them stops them all after this epoch (else the one that stopped would wait in a collective
        for the others, and they for it)."""
        mine = self.stop_signal  # read once: a signal arriving now counts at the next epoch
        if self.dist.min_int(0 if mine else 1):
            return ""
        return mine or "a signal to another process: stopped after this epoch to resume later"

    def _bar(self, total: int):
        """A progress bar for the whole run (rank 0, when asked for)."""
        if not (self.progress and self.dist.main):
            return None
        from .progress import progress
        return progress(total=total, unit="step", leave=True)

    def _epoch_record(self, epoch: int, losses: torch.Tensor, seconds: float) -> dict:
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = int(bad[0])
            raise NonFiniteLoss(f"the training loss became {losses[step].item()} at epoch {epoch + 1}, step "
                                f"{step + 1}; stopped, and the checkpoints saved so far keep the last finite "
                                "state (a lower lr, or precision fp32, may help)")
        record = {"epoch": epoch + 1, "loss": losses.mean().item(), "lr": self.optimizer.param_groups[0]["lr"],
                  "seconds": seconds, "steps": len(losses), "world_size": self.dist.world}
        if self.device.type == "cuda":
            record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

    def _validate(self, record: dict) -> str:
        """Validate (each process its share of the volumes), record it; returns why to stop, or ""."""
        start = time.perf_counter()
        dice_rows, losses = validate(self.predictor, self.data.validation, self.loss_fn, self.device)
        record["val_seconds"] = time.perf_counter() - start
        everyone = self.dist.gather((dice_rows.tolist(), losses.tolist()))
        dice = mean_over_volumes([row for rows, _ in everyone for row in rows])
        record["val_dice"] = dice
        record["val_loss"] = float(np.mean([v for _, ls in everyone for v in ls]))
        fg = [d for d in dice[1:] if d is not None]
        score = float(np.mean(fg)) if fg else -1.0
        record["val_mean_fg_dice"] = score
        state = self.state
        record["improved"] = score > state.best_score
        if record["improved"]:
            state.best_score, state.best_dice = score, dice
        if reached_early_stop(self.cfg, dice):
            return f"every organ reached validation Dice >= {self.cfg.early_stop_dice:g}"
        return ""

    def _replan(self, epoch: int) -> str:
        """The time limit: when the epochs timed so far show that the planned ones will not fit, shorten
        the run and let the learning rate reach zero at its new end. Returns the stop reason when this
        epoch is the shortened run's last."""
        cfg, state = self.cfg, self.state
        minutes = self.options.max_minutes
        budget = minutes * 60 if minutes > 0 else math.inf
        walls = [h["wall_seconds"] for h in state.history]
        fits = self.dist.min_int(time_limited_epochs(walls, budget, epoch + 1, cfg.epochs))
        if fits != state.planned:
            state.planned = fits
            if epoch + 1 < fits:
                self.schedule.replan((fits - epoch - 1) * self.data.batches.steps_per_epoch)
            self.say(f"WARNING: time limit of {minutes:g} min: at the speed measured so far this machine fits "
                     f"{fits} of {cfg.epochs} epochs; the learning rate now decays to zero over {fits}")
        if epoch + 1 >= state.planned and state.planned < cfg.epochs:
            return f"time limit of {minutes:g} minutes: stopped after {epoch + 1} of {cfg.epochs} planned epochs"
        return ""

    def _check_weights(self, epoch: int) -> None:
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.network.parameters()]).all()
        if not bool(finite):
            raise NonFiniteLoss(f"the weights became NaN or infinite in epoch {epoch + 1}; stopped, and the "
                                "checkpoints saved so far keep the last finite state")

    def _save(self, record: dict, write_last: bool, stopping: bool) -> None:
        """``new_model.pth`` when validation improved, ``last.pth`` when ``write_last``, the log every epoch."""
        rng = self.dist.gather({"cpu": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                                else None}) if write_last else None
        if not self.dist.main:
            return
        cfg, state = self.cfg, self.state
        extra = dict(train_config=cfg.to_dict(), epoch=record["epoch"] - 1, history=state.history,
                     best_score=state.best_score, best_val_dice=state.best_dice,
                     optimizer_state=self.optimizer.state_dict(), scheduler_state=self.schedule.state_dict(),
                     scaler_state=self.scaler.state_dict() if self.scaler is not None else {},
                     rng_states=rng, planned_epochs=state.planned, stopped=stopping,
                     world_size=self.dist.world)
        keep = dict(preprocessing=cfg.preprocessing, inference=inference_settings(cfg))
        start = time.perf_counter()
        # the best first: last.pth's best_score must never name a checkpoint not yet written
        if record.get("improved"):
            save_checkpoint(self.out / BEST_NAME, self.network, **keep, **extra)
        if write_last:
            save_checkpoint(self.out / LAST_NAME, self.network, **keep, **extra)
        record["save_seconds"] = time.perf_counter() - start
        write_log(self.out, state.history)
        self.log(epoch_line(record, state.planned))


@dataclass
class RunState:
    """What a run carries from epoch to epoch and keeps in ``last.pth`` to resume from."""

    start_epoch: int = 0
    planned: int = 0  # the epochs the run now plans (fewer when the time limit shortened it)
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    best_dice: list | None = None


class _SignalsStop:
    """While a run trains, SIGUSR1 and SIGTERM (a batch system's warning before its time limit) end it
    after the current epoch, with ``last.pth`` written: ``--resume`` continues from there."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.trainer.stop_signal = f"signal {signal.Signals(signum).name}: stopped after this epoch to resume later"

    def __enter__(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
