"""Training: the loop, validation, the learning-rate schedule, stopping rules, resume.

One code path serves the training chapter, ``hipseg train`` and
``torchrun -m hipseg_lib train`` (DistributedDataParallel: NCCL on GPUs, gloo on CPUs).
:func:`train` reads as the run's outline: prepare the data, build the network and optimiser,
restore a run, then per epoch :func:`_train_epoch`, :func:`_validate`, :func:`_save`. The
settings live in :mod:`~hipseg_lib.config`, the run folder in :mod:`~hipseg_lib.runs`, the
device, precision and processes in :mod:`~hipseg_lib.runtime`.
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
from .runtime import Autocast, CompiledOrEager, Dist, autocast_for, resolve_device, seed_everything

__all__ = ["train", "TrainResult", "TrainingStep", "NonFiniteLoss", "PolySchedule", "time_limited_epochs",
           "early_stop_reason"]


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


def _validate(net, loader, run: "_Run") -> np.ndarray:
    """Mean per-class Dice over the validation volumes (NaN-aware), reduced over ranks.

    Each volume is segmented on its training grid by the predictor pipeline that ``hipseg predict``
    runs (a network trained on patches in windows of its patch size), with its precision setting.
    """
    from .predict import TorchBackend
    from .predictor import InferenceSettings, Predictor

    settings = InferenceSettings(tta=False, postprocess=False, window=run.cfg.patch_shape, memory_bytes=1 << 62)
    predictor = Predictor(TorchBackend(net, run.device), run.cfg.preprocessing, settings)
    sums = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
    for image, label in loader:
        pred = predictor.grid_log_probabilities(image.numpy()).argmax(1)
        for p, t in zip(pred, label.numpy()):
            d = dice_per_class(p, t, NUM_CLASSES)
            ok = ~np.isnan(d)
            sums[ok] += torch.from_numpy(d[ok])
            counts[ok] += 1
    stats = run.dist.sum(torch.stack([sums, counts]).to(run.reduce_device)).cpu()
    with np.errstate(invalid="ignore"):
        return (stats[0] / stats[1]).numpy()


@dataclass
class _Run:
    """What one training run carries from epoch to epoch."""

    cfg: TrainConfig
    out: Path
    dist: Dist
    device: torch.device
    log: Callable[[str], None]
    steps_per_epoch: int = 0
    start_epoch: int = 0
    planned: int = 0
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    since_best: int = 0
    best_dice: list | None = None
    loss_fn: torch.nn.Module | None = None
    n_train: int = 0
    n_val: int = 0
    batches: TrainingBatches | None = None
    data_note: str = ""
    # set by _build: the network (``net``: its DDP wrapper, ``step_net``: compiled or eager), Adam,
    # the learning-rate schedule and the fp16 gradient scaler
    model: ResUNet3D | None = None
    net: torch.nn.Module | None = None
    step_net: Callable | None = None
    opt: torch.optim.Optimizer | None = None
    sched: "PolySchedule | None" = None
    scaler: torch.amp.GradScaler | None = None
    step: TrainingStep | None = None

    @property
    def reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def to_device(self, image: torch.Tensor) -> torch.Tensor:
        image = image.to(self.device, non_blocking=self.device.type == "cuda")
        if self.cfg.channels_last:
            image = image.to(memory_format=torch.channels_last_3d)
        return image

    def walls(self) -> list[float]:
        """Seconds each epoch of the run took in all (training, validation, saving), across resumes."""
        return [h.get("wall_seconds", h["epoch_seconds"]) for h in self.history]

    def say(self, message: str) -> None:
        if self.dist.main:
            self.log(message)


def train(cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike = "model",
          resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train a :class:`ResUNet3D` on the pairs found in ``data_dir``.

    Writes to ``out_dir``: ``new_model.pth`` (best validation mean Dice), ``last.pth``
    (every epoch; what ``resume`` continues from) and ``train_log.jsonl`` (one line per epoch).
    Under ``torchrun`` only rank 0 writes.

    Args:
        cfg: settings, e.g. ``make_config("cpu")``.
        data_dir: folder of image/label pairs (either HipMRI layout).
        out_dir: where checkpoints and the log go.
        resume: continue from ``out_dir/last.pth``.
        progress: show tqdm progress bars.
        log: where one-line messages go.

    Raises:
        HipsegError: bad data, an existing run in ``out_dir`` without ``resume``, ...
    """
    t_start = time.perf_counter()
    dist_ = Dist(cfg.device)
    try:
        device = resolve_device(cfg.device)
        if dist_.enabled and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the shapes are fixed: let cuDNN pick its fastest kernels
        run = _Run(cfg, Path(out_dir), dist_, device, log, planned=cfg.epochs)
        dist_.main_first(lambda: check_run_folder(run.out, resume), then_others=False)
        seed_everything(cfg.seed + dist_.rank)
        val_loader = _data(run, data_dir, progress)
        _build(run)
        if resume:
            _restore(run)
        result = TrainResult(best_path=run.out / BEST_NAME, last_path=run.out / LAST_NAME)
        if run.start_epoch >= cfg.epochs:
            result.history, result.stopped_because = run.history, "already complete"
            return result
        run.net = run.model
        if dist_.enabled:
            run.net = torch.nn.parallel.DistributedDataParallel(
                run.model, device_ids=[device.index] if device.type == "cuda" else None)
        run.step_net = CompiledOrEager(run.net, cfg.compile, agree=dist_.min_int)
        run.step = TrainingStep(run.step_net, run.loss_fn, run.opt, autocast_for(device, cfg.amp), cfg.grad_clip,
                                run.scaler if run.scaler.is_enabled() else None)
        _announce(run)
        stop = _epochs(run, val_loader, progress)
        result.history, result.stopped_because = run.history, stop
        if not result.best_path.exists():  # no validation happened: say so, name no file
            result.best_path = None
        result.best_val_dice = run.best_dice
        result.seconds = time.perf_counter() - t_start
        return result
    finally:
        dist_.close()


def _data(run: _Run, data_dir, progress: bool):
    """Preprocess (rank 0 fills the cache first), then the training batches and the validation loader.

    The training volumes live on the training device when they fit (``data_on``), and each batch
    is augmented there: no worker processes, so nothing a worker holds can go stale between
    epochs. One order for one or many processes: the same seed gives the same global batches, so a
    run on N processes matches a single-process run of the same global batch.
    """
    dist_ = run.dist
    # resample="spacing": the grid's voxel size is planned from the training scans (stored in checkpoints)
    run.cfg = cfg = dist_.main_first(lambda: with_planned_spacing(run.cfg, data_dir))
    vols = dist_.main_first(lambda: load_split_volumes(data_dir, cfg, progress=progress and dist_.main))
    if dist_.main:
        prepare_run_folder(run.out)
    aug = augmentation_named(cfg.augmentation) if cfg.augment else None
    patch = RandomPatch(cfg.patch_shape, cfg.foreground_fraction) if cfg.patch_shape else None
    train_set = TrainingSet(vols["train"], run.device, cfg.data_on)
    run.batches = TrainingBatches(train_set, cfg.batch_size, cfg.seed, aug, patch, dist_.rank, dist_.world)
    if run.batches.steps_per_epoch == 0:
        raise HipsegError(f"{data_dir}: too few training volumes ({len(train_set)}) for batch size "
                          f"{cfg.batch_size} x {dist_.world} process(es)")
    val_ds = SegmentationDataset(vols["val"])
    val_part = Subset(val_ds, list(range(dist_.rank, len(val_ds), dist_.world)))
    run.steps_per_epoch, run.n_train, run.n_val = run.batches.steps_per_epoch, len(train_set), len(val_ds)
    run.data_note = (f"training volumes on the {train_set.where} ({train_set.nbytes / 2**20:.1f} MiB), "
                     f"augmented on {run.device.type}")
    return DataLoader(val_part, batch_size=1, num_workers=0, pin_memory=run.device.type == "cuda")


def _build(run: _Run) -> None:
    """The network, Adam, the warm-up + polynomial schedule over the planned steps, the fp16 scaler,
    the loss: on ``run``."""
    cfg = run.cfg
    model = ResUNet3D(cfg.model).to(run.device)
    if run.device.type == "cpu":
        use_cpu_kernels(model)  # the same layers, faster kernels (cpu_kernels.py)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * run.steps_per_epoch
    sched = PolySchedule(opt, total_steps, warmup=min(50, total_steps // 10 + 1))
    amp_dtype = autocast_for(run.device, cfg.amp).dtype
    scaler = torch.amp.GradScaler(run.device.type, enabled=amp_dtype == torch.float16)
    run.loss_fn = DiceCELoss(NUM_CLASSES, dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight).to(run.device)
    run.model, run.opt, run.sched, run.scaler = model, opt, sched, scaler


def _restore(run: _Run) -> None:
    """Continue from ``last.pth``: weights, optimiser, schedule, history, best score, RNG.

    The network and the preprocessing must be the ones the run was started with.
    """
    path = run.out / LAST_NAME
    ck = read_checkpoint(path)
    for name, saved, mine in (("network", ModelConfig.from_dict(ck["model_config"]), run.cfg.model),
                              ("preprocessing", Preprocessing.from_dict(ck["preprocessing"]),
                               run.cfg.preprocessing)):
        diff = {k: v for k, v in saved.to_dict().items() if mine.to_dict()[k] != v}
        if diff:
            k = sorted(diff)[0]
            raise HipsegError(f"{path}: was trained with {k}={diff[k]}, not {mine.to_dict()[k]} ({name} "
                              "settings differ); resume with the same settings")
    run.model.load_state_dict(ck["model_state"])
    run.opt.load_state_dict(ck["optimizer_state"])
    run.sched.load_state_dict(ck["scheduler_state"])
    if ck.get("scaler_state"):
        run.scaler.load_state_dict(ck["scaler_state"])
    run.start_epoch = int(ck["epoch"]) + 1
    run.history = list(ck.get("history", []))
    run.best_score = float(ck.get("best_score", -math.inf))
    run.since_best = int(ck.get("since_best", 0))
    run.best_dice = ck.get("best_val_dice")
    _restore_rng(run, ck)
    cfg = run.cfg
    if int(ck.get("planned_epochs", cfg.epochs)) != cfg.epochs and run.start_epoch < cfg.epochs:
        # A run the time limit shortened: carry on to the planned end, decaying over the rest.
        run.sched.replan((cfg.epochs - run.start_epoch) * run.steps_per_epoch)
    run.say(f"resumed from {path} at epoch {run.start_epoch + 1}")


def _restore_rng(run: _Run, ck: dict) -> None:
    """Each process takes back its own random state (CPU, and CUDA on a GPU) from the checkpoint."""
    states = ck.get("rng_states") or ([{"cpu": ck["torch_rng"], "cuda": None}] if "torch_rng" in ck else [])
    if len(states) != run.dist.world:
        run.say(f"WARNING: the checkpoint holds the random states of {len(states)} process(es), this run has "
                f"{run.dist.world}: dropout and other random draws will not repeat the interrupted run")
        return
    mine = states[run.dist.rank]
    torch.set_rng_state(mine["cpu"])
    if mine.get("cuda") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], run.device)


def _announce(run: _Run) -> None:
    amp_dtype = autocast_for(run.device, run.cfg.amp).dtype
    amp_name = str(amp_dtype).replace("torch.", "") if amp_dtype else "off"
    n_params = sum(p.numel() for p in run.model.parameters())
    dist_, cfg = run.dist, run.cfg
    run.say(f"training {n_params / 1e6:.2f} M parameters on {run.device} x {dist_.world}"
            + (f" ({dist_.backend})" if dist_.enabled else "") + f", amp {amp_name};\n"
            f"{run.n_train} train / {run.n_val} val volumes at {cfg.preprocessing.target_shape}, "
            f"batch {cfg.batch_size};\n{run.data_note}")


def _epochs(run: _Run, val_loader, progress) -> str:
    """The epochs from ``run.start_epoch``: train, validate, re-plan for the time limit, save, log.
    Returns why the run stopped. The run's last epoch is always validated, however it ends (as
    planned, shortened by the time limit, or by a stopping rule), so its best checkpoint exists."""
    cfg = run.cfg
    # One bar for the whole run (its ETA is the run's) where someone watches it live; in the
    # executed book (plain progress) the one line per epoch, with its ETA, says the same.
    bar = None
    if progress and run.dist.main and os.environ.get("HIPSEG_PLAIN_PROGRESS") != "1":
        from .progress import progress as tqdm
        bar = tqdm(total=(run.planned - run.start_epoch) * run.steps_per_epoch, unit="step", leave=True)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    run.model.train()
    stop = ""
    for epoch in range(run.start_epoch, cfg.epochs):
        t_wall = time.perf_counter()
        if bar is not None:
            bar.total = (run.planned - run.start_epoch) * run.steps_per_epoch
            bar.set_description(f"epoch {epoch + 1}/{run.planned}")
        record = {"epoch": epoch + 1, **_train_epoch(run, epoch, bar)}
        validated = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        improved = False
        if validated:
            improved, stop = _score(run, record, _validate(run.net, val_loader, run))
        record["wall_seconds"] = time.perf_counter() - t_wall
        run.history.append(record)
        limit = _replan(run, epoch)
        if limit and not validated:  # the shortened run ends here: its last weights are a candidate
            improved, _ = _score(run, record, _validate(run.net, val_loader, run))
            validated = True
            record["wall_seconds"] = time.perf_counter() - t_wall
        stop = stop or limit
        record["planned_epochs"] = run.planned
        _check_weights(run, epoch)
        write_last = validated or bool(stop) or cfg.save_every_epoch
        rng_states = run.dist.gather(_rng_state(run.device)) if write_last else None  # every rank's
        if run.dist.main:
            _save(run, record, improved, stop, rng_states)
            _log_epoch(run, epoch, record)
        if stop:
            break
    if bar is not None:
        bar.close()
    if not stop:
        stop = f"planned {cfg.epochs} epochs done"
    run.say(("WARNING: " if run.planned < cfg.epochs else "") + f"stopped: {stop}")
    return stop


def _train_epoch(run: _Run, epoch: int, bar) -> dict:
    """One pass over the epoch's training batches (:class:`TrainingStep` on each); the epoch's record.

    The losses stay on the device and are read once, at the end of the epoch (no host
    synchronisation per step). A NaN or infinite loss on any process stops the run with
    :class:`NonFiniteLoss`, before anything is saved. ``data_fraction`` is the share of the epoch
    spent drawing and augmenting batches (timed with CUDA events on a GPU)."""
    device, n = run.device, run.steps_per_epoch
    timer = _Timer(device)
    losses = torch.zeros(n, dtype=torch.float32, device=device)
    it = run.batches.epoch(epoch)
    for k in range(n):
        mark = timer.mark()
        image, label = next(it)
        image = run.to_device(image)
        timer.data_done(mark)
        losses[k] = run.step(image, label)
        run.sched.step()
        if bar is not None:
            bar.update(1)
            if k % 20 == 19 or k == n - 1:  # an occasional read of the loss, for the bar only
                bar.set_postfix(loss=f"{losses[max(0, k - 9):k + 1].mean().item():.3f}")
    epoch_s, data_s = timer.finish()
    per_step = run.dist.sum(losses.to(run.reduce_device))  # every rank sees every rank's losses
    bad = (~torch.isfinite(per_step)).nonzero()
    if len(bad):
        raise NonFiniteLoss(f"the training loss became {per_step[int(bad[0])].item()} at epoch {epoch + 1}, "
                            f"step {int(bad[0]) + 1} of {n}; stopped, and the checkpoints keep the last "
                            "finite state (a lower lr, grad_clip > 0 or amp=off may help)")
    total = float(per_step.sum()) / run.dist.world
    record = {"loss": total / n, "lr": run.opt.param_groups[0]["lr"], "epoch_seconds": epoch_s,
              "step_seconds": epoch_s / n, "data_fraction": data_s / epoch_s,
              "steps": n, "world_size": run.dist.world, "steps_all_ranks": n * run.dist.world}
    if device.type == "cuda":
        record["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


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


def _score(run: _Run, record: dict, val: np.ndarray) -> tuple[bool, str]:
    """Record a validation; returns (better than the best so far, why to stop or "")."""
    record["val_dice"] = [None if np.isnan(v) else float(v) for v in val]
    score = float(np.nanmean(val[1:])) if np.any(~np.isnan(val[1:])) else -1.0
    record["val_mean_fg_dice"] = score
    improved = score > run.best_score
    if improved:
        run.best_score, run.since_best, run.best_dice = score, 0, record["val_dice"]
    else:
        run.since_best += 1
    return improved, early_stop_reason(val, run.since_best, run.cfg.early_stop_dice, run.cfg.patience)


def _replan(run: _Run, epoch: int) -> str:
    """The time limit is a safety net: when the epochs timed so far show that the planned ones will
    not fit, shorten the run and let the learning rate reach zero at its new end. Returns the stop
    reason when this epoch is the (shortened) run's last."""
    cfg = run.cfg
    walls = run.walls()
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes > 0 else math.inf
    fits = run.dist.min_int(time_limited_epochs(walls, budget_s, epoch + 1, cfg.epochs))  # ranks agree
    if fits != run.planned:  # shorter, or back towards the plan once epochs turn out faster
        run.planned = fits
        if epoch + 1 < fits:
            run.sched.replan((fits - epoch - 1) * run.steps_per_epoch)
        run.say(f"WARNING: time limit of {cfg.max_minutes:g} min: at the speed measured so far this "
                f"machine fits {fits} of {cfg.epochs} epochs; the learning rate now decays to "
                f"zero over {fits}")
    if epoch + 1 >= run.planned and run.planned < cfg.epochs:
        return (f"time limit of {cfg.max_minutes:g} minutes: training stopped after {epoch + 1} of "
                f"{cfg.epochs} planned epochs")
    return ""


def _check_weights(run: _Run, epoch: int) -> None:
    """Stop with :class:`NonFiniteLoss` when a weight is NaN or infinite (every rank holds the same
    weights, so every rank stops), before anything is saved."""
    finite = torch.stack([torch.isfinite(p.detach()).all() for p in run.model.parameters()]).all()
    if not bool(finite):
        raise NonFiniteLoss(f"the weights became NaN or infinite in epoch {epoch + 1}; stopped, and the "
                            "checkpoints keep the last finite state (a lower lr or grad_clip > 0 may help)")


def _rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU's and, on a GPU, the CUDA generator's (dropout draws there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _save(run: _Run, record: dict, improved: bool, stop: str, rng_states: list | None) -> None:
    """``new_model.pth`` when validation improved; ``last.pth`` when ``rng_states`` are given (at
    validation epochs, at the stop, or every epoch with ``save_every_epoch``); the log every epoch."""
    opt, sched, scaler, model = run.opt, run.sched, run.scaler, run.model
    cfg = run.cfg
    extra = dict(train_config=cfg.to_dict(), epoch=record["epoch"] - 1, history=run.history,
                 best_score=run.best_score, since_best=run.since_best, best_val_dice=run.best_dice,
                 optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
                 scaler_state=scaler.state_dict() if scaler.is_enabled() else {},
                 rng_states=rng_states, metrics=record, planned_epochs=run.planned, stopped_because=stop)
    if rng_states is not None:
        save_checkpoint(run.out / LAST_NAME, model, cfg.model, cfg.preprocessing, **extra)
    if improved:
        save_checkpoint(run.out / BEST_NAME, model, cfg.model, cfg.preprocessing, **extra)
    write_log(run.out, run.history)


def _log_epoch(run: _Run, epoch: int, record: dict) -> None:
    """One line per epoch, within 80 characters (the book's column); the log file has it all."""
    dice_txt = " ".join(f"{v:.2f}" if v is not None else "nan" for v in record.get("val_dice", []))
    walls = run.walls()
    eta = (run.planned - epoch - 1) * float(np.mean(walls[-(epoch + 1 - run.start_epoch):]))
    run.log(f"epoch {epoch + 1}/{run.planned} loss {record['loss']:.3f} {record['step_seconds']:.2f} s/step"
            + (f" Dice {dice_txt}" if dice_txt else "") + f" ETA {_clock(eta)}")
