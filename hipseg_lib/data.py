"""From files to batches: the split by patient, a cache of preprocessed volumes, and the
training batches (cut into patches and augmented).

Decoding a ``.nii.gz`` and preprocessing it takes far longer than reading a ``.npy``, so each pair
is preprocessed once and stored in a cache folder; the cache key covers the source files, the
preprocessing settings and the source of the code that computes it.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import HipsegError
from ._atomic import atomic_path
from .augment import RandomAugmentation, RandomPatch, augment_batch
from .io import Pair, VolumeId, find_pairs, load_pair
from .preprocess import Placement, Preprocessing, foreground_box, preprocess_pair, reorient

__all__ = ["split_by_case", "split_folder", "cases_of", "CachedVolume", "cache_pairs",
           "load_split_volumes", "TrainingSet", "TrainingBatches", "plan_target_spacing",
           "with_planned_spacing", "SPLITS"]

SPLITS = ("train", "val", "test")


def cases_of(pairs: Sequence[Pair]) -> list[str]:
    """Sorted unique case (patient) IDs of ``pairs``."""
    return sorted({p.id.case for p in pairs})


def split_by_case(pairs: Sequence[Pair], fractions=(0.8, 0.1, 0.1),
                  seed: int = 0) -> dict[str, list[Pair]]:
    """Split pairs into train/val/test so that no patient is in two subsets:
    the patients are shuffled with ``seed``; validation and test each get
    ``max(1, round(fraction * patients))`` of them, training the rest.

    Raises:
        HipsegError: fewer than 3 patients (each subset needs one).
    """
    cases = cases_of(pairs)
    n = len(cases)
    if n < 3:
        raise HipsegError(f"too few patients to split: {n} found, need at "
                          "least 3 (train, validation and test each need one)")
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [cases[i] for i in order]
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    if n - n_val - n_test < 1:
        n_val = n_test = 1
    groups = {"test": set(shuffled[:n_test]),
              "val": set(shuffled[n_test:n_test + n_val]),
              "train": set(shuffled[n_test + n_val:])}
    return {name: [p for p in pairs if p.id.case in groups[name]]
            for name in SPLITS}


def split_folder(data_dir: str | os.PathLike,
                 seed: int = 0) -> dict[str, list[Pair]]:
    """The pairs found in ``data_dir``, split by patient: the one split that
    training, evaluation and the benchmarks share."""
    pairs = find_pairs(data_dir).pairs
    if not pairs:
        raise HipsegError(f"{data_dir}: no image/label pairs found")
    return split_by_case(sorted(pairs, key=lambda p: p.id), seed=seed)


@dataclass(frozen=True)
class CachedVolume:
    """A preprocessed pair in the cache: its arrays' files, its voxel
    ``spacing`` once turned to the preprocessing's orientation, and its
    :class:`~hipseg_lib.preprocess.Placement` (where its grid came from)."""

    id: VolumeId
    image: Path
    label: Path
    spacing: tuple[float, float, float]
    placement: Placement

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) on the network's grid."""
        return self.placement.crop_spacing(self.spacing)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The image (float32) and label (uint8) on the network's grid."""
        return np.load(self.image), np.load(self.label)


# The modules whose code turns a pair of files into cached arrays: a change
# to either makes new cache files.
CACHED_BY = ("io", "preprocess")


def _key(pair: Pair, cfg: Preprocessing) -> str:
    """What the cached arrays depend on: the source files (path, size,
    modification time), the settings and the code that computes them."""
    h = hashlib.sha256()
    for f in (pair.image, pair.label):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for name in CACHED_BY:
        h.update(Path(__file__).with_name(f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def _cache_one(pair: Pair, cfg: Preprocessing, stem: str) -> dict:
    """Load, check and preprocess one pair; write its two arrays and a small
    JSON of what :class:`CachedVolume` needs."""
    image, label = load_pair(pair)
    turn = reorient(image.affine, cfg.orientation)
    spacing = turn.spacing(image.spacing)
    img, lab, where = preprocess_pair(turn.apply(image.array),
                                      turn.apply(label.array), cfg, spacing,
                                      name=str(pair.image))
    for suffix, array in (("image.npy", img), ("label.npy", lab)):
        with atomic_path(Path(f"{stem}_{suffix}"), suffix=".npy") as tmp:
            np.save(tmp, array)
    meta = {"spacing": list(spacing), "placement": where.to_dict()}
    with atomic_path(Path(f"{stem}_meta.json")) as tmp:
        Path(tmp).write_text(json.dumps(meta))
    return meta


def _one_thread() -> None:
    torch.set_num_threads(1)  # a worker per core: one thread each


def cache_pairs(pairs: Sequence[Pair], cfg: Preprocessing,
                cache_dir: str | os.PathLike,
                workers: int | None = None) -> list[CachedVolume]:
    """Preprocess each pair once (in ``workers`` processes, default: one per
    core) and return the cached volumes.

    Raises:
        HipsegError: a pair fails its checks (the message names the file).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stems = [str(cache / f"{p.id}_{_key(p, cfg)}") for p in pairs]
    metas: dict[int, dict] = {}
    for n, stem in enumerate(stems):  # what is cached already
        meta = Path(f"{stem}_meta.json")
        if meta.exists():
            metas[n] = json.loads(meta.read_text())
    todo = [n for n in range(len(pairs)) if n not in metas]
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    if workers > 1:  # a forked process cannot use its parent's CUDA
        start = "spawn" if torch.cuda.is_initialized() else None
        with ProcessPoolExecutor(workers, get_context(start),
                                 initializer=_one_thread) as pool:
            jobs = [pool.submit(_cache_one, pairs[n], cfg, stems[n])
                    for n in todo]
            for n, job in zip(todo, jobs):
                metas[n] = job.result()
    else:
        for n in todo:
            metas[n] = _cache_one(pairs[n], cfg, stems[n])
    return [CachedVolume(p.id, Path(f"{s}_image.npy"), Path(f"{s}_label.npy"),
                         tuple(metas[n]["spacing"]),
                         Placement.from_dict(metas[n]["placement"]))
            for n, (p, s) in enumerate(zip(pairs, stems))]


def plan_target_spacing(pairs: Sequence[Pair], cfg: Preprocessing
                        ) -> tuple[float, float, float]:
    """The voxel size (mm) every body crop is resampled to with
    ``resample="spacing"``: the training scans' median spacing, made coarser
    along an axis where the largest body crop would not fit in
    ``cfg.target_shape`` voxels (so that no training scan is cut)."""
    if not pairs:
        raise HipsegError("cannot plan a target spacing without training scans")
    rows = []
    for pair in pairs:
        image, _ = load_pair(pair)
        turn = reorient(image.affine, cfg.orientation)
        array, spacing = turn.apply(image.array), turn.spacing(image.spacing)
        box = foreground_box(array)
        rows.append([*spacing, *((b - a) * s for (a, b), s in zip(box, spacing))])
    table = np.array(rows)
    median, largest = np.median(table[:, :3], axis=0), table[:, 3:].max(axis=0)
    x, y, z = (round(float(max(m, e / n)), 3)
               for m, e, n in zip(median, largest, cfg.target_shape))
    return x, y, z


def with_planned_spacing(cfg, data_dir: str | os.PathLike):
    """``cfg`` (a ``TrainConfig``) with its target spacing planned from the
    training patients of ``data_dir`` when it resamples to a spacing not
    planned yet; otherwise ``cfg`` itself."""
    prep = cfg.preprocessing
    if prep.resample != "spacing" or prep.target_spacing is not None:
        return cfg
    train = split_folder(data_dir, cfg.split_seed)["train"]
    return cfg.replace(target_spacing=plan_target_spacing(train, prep))


def load_split_volumes(data_dir: str | os.PathLike, cfg,
                       cache_dir: str | os.PathLike
                       ) -> dict[str, list[CachedVolume]]:
    """Every pair of ``data_dir``, split by patient with ``cfg.split_seed`` and
    preprocessed with ``cfg.preprocessing`` (cached):
    ``{"train": [...], "val": [...], "test": [...]}``."""
    cfg = with_planned_spacing(cfg, data_dir)
    split = split_folder(data_dir, cfg.split_seed)
    return {name: cache_pairs(pairs, cfg.preprocessing, cache_dir)
            for name, pairs in split.items()}


class TrainingSet:
    """The training volumes as two tensors on the training device: images
    ``(N, 1, X, Y, Z)`` and labels ``(N, X, Y, Z)`` (uint8), so that a step
    takes its batch by index, with no worker processes. On a GPU the images
    are kept in bf16, or in host memory when they would take more than a
    quarter of the GPU's free memory."""

    def __init__(self, volumes: Sequence[CachedVolume], device: torch.device):
        if not volumes:
            raise HipsegError("no training volumes")
        self.volumes, self.device = list(volumes), torch.device(device)
        arrays = [v.load() for v in self.volumes]
        if len({a.shape for a, _ in arrays}) != 1:
            raise HipsegError("the training volumes differ in shape")
        gpu = self.device.type == "cuda"
        images = torch.stack([torch.from_numpy(a)[None] for a, _ in arrays])
        labels = torch.stack([torch.from_numpy(b) for _, b in arrays])
        if gpu:
            images = images.to(torch.bfloat16)
        home = self.device
        if gpu and 3 * labels.numel() > torch.cuda.mem_get_info(home)[0] // 4:
            home = torch.device("cpu")  # too large: copied a batch at a time
        self.images, self.labels = images.to(home), labels.to(home)

    def __len__(self) -> int:
        return len(self.volumes)

    def take(self, indices: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32) and labels (int64) of ``indices``, on the device."""
        index = torch.tensor(list(indices), device=self.images.device)
        images = self.images.index_select(0, index).to(self.device)
        labels = self.labels.index_select(0, index).to(self.device)
        return images.float(), labels.long()


class TrainingBatches:
    """The batches of each epoch: the volumes shuffled anew every epoch,
    ``batch_size`` per step; each sample cut to a random patch (``patch``)
    and augmented (``augmentation``), on the device where it trains.

    Sample ``i`` of epoch ``e`` draws its patch and augmentation from
    ``np.random.default_rng([seed, e, i])``: the same batches on any
    machine. Under several processes (``rank`` of ``world``) each takes every
    ``world``-th volume of the shuffled order, so that N processes of batch
    ``b`` see the batches one process of batch ``N * b`` sees.
    """

    def __init__(self, train_set: TrainingSet, batch_size: int, seed: int = 0,
                 augmentation: RandomAugmentation | None = None,
                 patch: RandomPatch | None = None, rank: int = 0,
                 world: int = 1):
        self.train_set, self.batch_size, self.seed = train_set, batch_size, seed
        self.augmentation, self.patch = augmentation, patch
        self.rank, self.world = rank, world
        self.steps_per_epoch = len(train_set) // world // batch_size
        if self.steps_per_epoch == 0:
            raise HipsegError(f"too few training volumes ({len(train_set)}) "
                              f"for batch size {batch_size} x {world} "
                              "process(es)")

    def order(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch``, as lists of volume indices."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        shuffled = torch.randperm(len(self.train_set), generator=g).tolist()
        mine = shuffled[self.rank::self.world]
        n = self.batch_size
        return [mine[k * n:(k + 1) * n] for k in range(self.steps_per_epoch)]

    def batch(self, epoch: int, indices: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 1, X, Y, Z)`` and labels ``(N, X, Y, Z)`` of one batch."""
        images, labels = self.train_set.take(indices)
        rngs = [np.random.default_rng([self.seed, epoch, i]) for i in indices]
        if self.patch is not None:  # a random window of each volume
            cut = [self.patch.sample(rng, lab)(img, lab)
                   for rng, img, lab in zip(rngs, images, labels)]
            images = torch.stack([img for img, _ in cut])
            labels = torch.stack([lab for _, lab in cut])
        if self.augmentation is not None:
            spacing = [self.train_set.volumes[i].grid_spacing for i in indices]
            augs = [self.augmentation.sample(rng, s)
                    for rng, s in zip(rngs, spacing)]
            images, labels = augment_batch(images, labels, augs)
        return images, labels

    def epoch(self, epoch: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of ``epoch``, in order."""
        for indices in self.order(epoch):
            yield self.batch(epoch, indices)
