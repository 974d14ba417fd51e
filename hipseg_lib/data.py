"""From files to batches: the split by patient, a cache of preprocessed
volumes, and the training batches (cut into patches and augmented).

Reading and preprocessing a ``.nii.gz`` takes far longer than reading a
``.npy``, so each pair is preprocessed once and kept in a cache folder, under
a key made of the source files, the settings and the code that computed it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from . import HipsegError, SettingsError, available_cpus
from ._atomic import atomic_path
from .augment import RandomAugmentation, RandomPatch, augment_batch
from .io import Pair, VolumeId, find_pairs, load_pair
from .preprocess import Box, Preprocessing, preprocess_pair, reorient

__all__ = ["split_by_case", "split_folder", "cases_of", "CachedVolume",
           "cache_pairs", "load_split_volumes", "TrainingSet",
           "TrainingBatches"]


def cases_of(pairs) -> list[str]:
    """The sorted patient (case) IDs of ``pairs``."""
    return sorted({p.id.case for p in pairs})


def split_by_case(pairs: Sequence, fractions=(0.8, 0.1, 0.1),
                  seed: int = 0, fold: int | None = None,
                  folds: int = 5) -> dict[str, list]:
    """Split pairs (or anything with an ``id``) into train, val and test so
    that no patient is in two: the patients are shuffled with ``seed``;
    validation and test each get ``max(1, round(fraction * patients))``.

    ``fold`` (0 to ``folds - 1``) is for cross-validation, as nnU-Net does
    it: the test patients stay the same, the others are dealt into
    ``folds`` groups like cards, and group ``fold`` validates.

    Raises:
        HipsegError: fewer than 3 patients (each subset needs one), or
            fewer patients outside the test set than folds.
    """
    cases = cases_of(pairs)
    n = len(cases)
    if n < 3:
        raise HipsegError(f"too few patients to split: {n} found, need at "
                          "least 3 (train, validation and test each need one)")
    shuffled = [cases[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    if n - n_val - n_test < 1:
        n_val = n_test = 1
    test, rest = shuffled[:n_test], shuffled[n_test:]
    if fold is None:
        val = rest[:n_val]
    else:
        check_fold(fold, folds)
        if len(rest) < folds:
            raise HipsegError(f"too few patients for {folds} folds: "
                              f"{len(rest)} outside the test set")
        val = rest[fold::folds]
    subset = {c: "test" for c in test} | {c: "val" for c in val}
    return {name: [p for p in pairs if subset.get(p.id.case, "train") == name]
            for name in ("train", "val", "test")}


def check_fold(fold: int | None, folds: int) -> None:
    """Refuse a fold that is not one of ``0 .. folds - 1``."""
    if folds < 2 or (fold is not None and not 0 <= fold < folds):
        raise SettingsError(f"fold must be 0 to folds - 1 and folds >= 2, "
                            f"got fold {fold} of {folds}")


def split_folder(data_dir, seed: int = 0, fold: int | None = None,
                 folds: int = 5) -> dict[str, list[Pair]]:
    """The pairs of ``data_dir``, split by patient: the one split that
    training, evaluation and the benchmarks share."""
    pairs = find_pairs(data_dir).pairs
    if not pairs:
        raise HipsegError(f"{data_dir}: no image/label pairs found")
    return split_by_case(pairs, seed=seed, fold=fold, folds=folds)


@dataclass(frozen=True)
class CachedVolume:
    """A preprocessed pair in the cache: its two arrays' files, the body
    crop's ``box`` (in the oriented scan) and the grid's voxel size (mm)."""

    id: VolumeId
    image: Path
    label: Path
    box: Box
    grid_spacing: tuple[float, float, float]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The image (float32) and label (uint8) on the network's grid."""
        return np.load(self.image), np.load(self.label)


# The modules whose code computes the cached arrays: an edit of either one
# makes new cache files.
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
    """Load, check and preprocess one pair; write its two arrays and a JSON
    of its box and grid spacing (returned too)."""
    image, label = load_pair(pair)
    turn = reorient(image.affine, cfg.orientation)
    spacing = turn.spacing(image.spacing)
    img, lab, box = preprocess_pair(turn.apply(image.array),
                                    turn.apply(label.array), cfg,
                                    name=str(pair.image))
    grid = [s * (b - a) / n  # the crop's extent over its voxels on the grid
            for s, (a, b), n in zip(spacing, box, cfg.target_shape)]
    for suffix, array in (("image.npy", img), ("label.npy", lab)):
        with atomic_path(Path(f"{stem}_{suffix}"), suffix=".npy") as tmp:
            np.save(tmp, array)
    meta = {"box": box, "grid_spacing": grid}
    with atomic_path(Path(f"{stem}_meta.json")) as tmp:
        Path(tmp).write_text(json.dumps(meta))
    return meta


def _one_thread() -> None:
    torch.set_num_threads(1)  # a worker per core: one thread each


def cache_pairs(pairs: Sequence[Pair], cfg: Preprocessing, cache_dir,
                workers: int | None = None) -> list[CachedVolume]:
    """Preprocess each pair once (``workers`` processes; default: one per
    core) and return the cached volumes.

    Raises:
        HipsegError: a pair fails its checks (the message names the file).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stems = [str(cache / f"{p.id}_{_key(p, cfg)}") for p in pairs]
    metas = {n: json.loads(Path(f"{s}_meta.json").read_text())
             for n, s in enumerate(stems) if Path(f"{s}_meta.json").exists()}
    todo = [n for n in range(len(pairs)) if n not in metas]
    workers = min(workers or available_cpus(), max(1, len(todo)))
    if workers > 1:  # a forked process cannot use its parent's CUDA
        start = "spawn" if torch.cuda.is_initialized() else None
        with ProcessPoolExecutor(workers, get_context(start),
                                 initializer=_one_thread) as pool:
            jobs = {n: pool.submit(_cache_one, pairs[n], cfg, stems[n])
                    for n in todo}
            metas |= {n: job.result() for n, job in jobs.items()}
    else:
        metas |= {n: _cache_one(pairs[n], cfg, stems[n]) for n in todo}
    out = []
    for n, (pair, stem) in enumerate(zip(pairs, stems)):
        (x0, x1), (y0, y1), (z0, z1) = metas[n]["box"]
        gx, gy, gz = metas[n]["grid_spacing"]
        out.append(CachedVolume(pair.id, Path(f"{stem}_image.npy"),
                                Path(f"{stem}_label.npy"),
                                ((x0, x1), (y0, y1), (z0, z1)), (gx, gy, gz)))
    return out


def load_split_volumes(data_dir, cfg, cache_dir) -> dict[str, list]:
    """Every pair of ``data_dir``, split by patient with ``cfg.split_seed``
    (and ``cfg.fold``) and preprocessed with ``cfg.preprocessing`` (cached):
    ``{"train": [...], "val": [...], "test": [...]}``."""
    split = split_folder(data_dir, cfg.split_seed, cfg.fold, cfg.folds)
    return {name: cache_pairs(pairs, cfg.preprocessing, cache_dir)
            for name, pairs in split.items()}


# The training set lives on the GPU if it takes at most this share of the
# memory free there; else in host memory, copied a batch at a time
GPU_DATA_SHARE = 0.25


class TrainingSet:
    """The training volumes as two tensors on the training device, images
    ``(N, 1, X, Y, Z)`` (float32) and labels ``(N, X, Y, Z)`` (uint8), so
    that a step takes its batch by index with no worker processes. On a GPU
    they stay on the host if they would take more than ``GPU_DATA_SHARE``
    of its free memory."""

    def __init__(self, volumes: Sequence[CachedVolume], device):
        if not volumes:
            raise HipsegError("no training volumes")
        self.volumes, self.device = list(volumes), torch.device(device)
        arrays = [v.load() for v in self.volumes]
        images = torch.stack([torch.from_numpy(i)[None] for i, _ in arrays])
        labels = torch.stack([torch.from_numpy(lab) for _, lab in arrays])
        self.images, self.labels = images, labels
        if self.device.type == "cuda":
            size = sum(t.numel() * t.element_size() for t in (images, labels))
            if size <= GPU_DATA_SHARE * torch.cuda.mem_get_info(self.device)[0]:
                self.images, self.labels = images.to(device), labels.to(device)

    def __len__(self) -> int:
        return len(self.volumes)

    def take(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32) and labels (int64) of ``indices``, on the
        device."""
        index = torch.tensor(list(indices), device=self.images.device)
        images, labels = (t.index_select(0, index)
                          for t in (self.images, self.labels))
        if images.device != self.device:  # kept on the host: copy the batch
            images, labels = (t.pin_memory().to(self.device, non_blocking=True)
                              for t in (images, labels))
        return images, labels.long()


class TrainingBatches:
    """The batches of each epoch: the volumes shuffled anew every epoch,
    ``batch_size`` per step, each sample cut to a random patch and augmented
    where it trains.

    Epoch ``e``'s order comes from the seed sequence ``[seed, e]`` and its
    sample ``i``'s patch and augmentation from
    ``np.random.default_rng([seed, e, i])``: the same batches on any machine.
    Under several processes, each takes every ``world``-th volume of the
    shuffled order, so that N processes of batch ``b`` see what one process
    of batch ``N * b`` sees.
    """

    def __init__(self, train_set: TrainingSet, batch_size: int,
                 seed: int = 0, augmentation: RandomAugmentation | None = None,
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
        """This process's batches of ``epoch``, as volume indices."""
        # one stream per (seed, epoch): no seed replays another's epochs
        stream = np.random.SeedSequence([self.seed, epoch]).generate_state(1)
        g = torch.Generator().manual_seed(int(stream[0]))
        shuffled = torch.randperm(len(self.train_set), generator=g).tolist()
        mine, n = shuffled[self.rank::self.world], self.batch_size
        return [mine[k * n:(k + 1) * n] for k in range(self.steps_per_epoch)]

    def batch(self, epoch: int, indices: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 1, X, Y, Z)`` and labels ``(N, X, Y, Z)``."""
        images, labels = self.train_set.take(indices)
        rngs = [np.random.default_rng([self.seed, epoch, i]) for i in indices]
        if self.patch is not None:  # a random window of each volume
            cuts = [self.patch.sample(rng, lab)(img, lab)
                    for rng, img, lab in zip(rngs, images, labels)]
            images = torch.stack([img for img, _ in cuts])
            labels = torch.stack([lab for _, lab in cuts])
        if self.augmentation is not None:
            volumes = self.train_set.volumes
            augs = [self.augmentation.sample(rng, volumes[i].grid_spacing)
                    for rng, i in zip(rngs, indices)]
            images, labels = augment_batch(images, labels, augs)
        return images, labels

    def epoch(self, epoch: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of ``epoch``, in order."""
        for indices in self.order(epoch):
            yield self.batch(epoch, indices)
