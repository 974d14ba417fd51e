"""Case-level splitting, a preprocessing cache, and the torch Dataset.

Decoding a 256x256x128 ``.nii.gz`` takes ~160 ms, so each pair is preprocessed once and
stored as ``.npy`` (~3 ms to load, memory-mapped); the cache key covers the source files
(path, size, modification time), the preprocessing settings and the source of the code that
computes the cache (:func:`code_fingerprint`).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import HipsegError
from ._atomic import atomic_path
from .io import Pair, VolumeId, find_pairs, load_pair
from .preprocess import Placement, Preprocessing, foreground_box, preprocess_pair, reorient
from .runtime import available_bytes, host_to

__all__ = [
    "split_by_case", "split_folder", "cases_of", "default_cache_dir", "CachedVolume", "cache_pairs",
    "load_split_volumes", "SegmentationDataset", "TrainingSet", "TrainingBatches", "preprocessing_workers",
    "plan_target_spacing", "with_planned_spacing",
]

SPLITS = ("train", "val", "test")


def cases_of(pairs: Iterable[Pair]) -> list[str]:
    """Sorted unique case IDs of ``pairs``."""
    return sorted({p.id.case for p in pairs})


def split_by_case(pairs: Sequence[Pair], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> dict[str, list[Pair]]:
    """Split pairs into train/val/test so that no case (patient) is in two subsets.

    Cases are shuffled with ``seed``; validation and test each get
    ``max(1, round(fraction * n_cases))`` cases and training the rest.

    Args:
        pairs: image/label pairs, e.g. ``find_pairs(root).pairs``.
        fractions: train, val, test fractions of the cases (sum to 1).
        seed: makes the split reproducible.

    Raises:
        HipsegError: fewer than 3 cases (each subset needs one).

    Example:
        >>> split = split_by_case(find_pairs("data/synthetic").pairs, seed=0)  # doctest: +SKIP
        >>> {k: len(v) for k, v in split.items()}  # doctest: +SKIP
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    cases = cases_of(pairs)
    if len(cases) < 3:
        raise HipsegError(f"too few cases to split: {len(cases)} found, need at least 3 "
                          "(train, validation and test each need one)")
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    n = len(cases)
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    if n - n_val - n_test < 1:
        n_val, n_test = 1, 1
    groups = {
        "test": set(shuffled[:n_test]),
        "val": set(shuffled[n_test:n_test + n_val]),
        "train": set(shuffled[n_test + n_val:]),
    }
    return {name: sorted((p for p in pairs if p.id.case in groups[name]), key=lambda p: p.id)
            for name in SPLITS}


def split_folder(data_dir: str | os.PathLike, seed: int = 0) -> dict[str, list[Pair]]:
    """The pairs found in ``data_dir``, split by case: the one split training, evaluation and
    the benchmarks share (``split_folder(data, cfg.split_seed)["test"]`` are the test pairs).

    Raises:
        HipsegError: no pairs found, or fewer than 3 cases.
    """
    search = find_pairs(data_dir)
    if not search.pairs:
        raise HipsegError(f"{data_dir}: no image/label pairs found")
    return split_by_case(search.pairs, seed=seed)


def default_cache_dir() -> Path:
    """``$HIPSEG_CACHE``, else ``$XDG_CACHE_HOME/hipseg``, else ``~/.cache/hipseg``."""
    if os.environ.get("HIPSEG_CACHE"):
        return Path(os.environ["HIPSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hipseg"


@dataclass(frozen=True)
class CachedVolume:
    """A preprocessed pair on disk; ``spacing`` and ``original_shape`` are those of the volume
    turned to the preprocessing orientation; ``placement`` says where its grid came from (the body
    crop ``box``, its resampled shape and how it sits in the grid)."""

    id: VolumeId
    image: Path
    label: Path
    spacing: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    placement: Placement
    pair: Pair

    @property
    def box(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The body crop, in voxels of the oriented volume."""
        return self.placement.box

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the preprocessed grid."""
        return self.placement.crop_spacing(self.spacing)

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        if mmap:
            return np.load(self.image, mmap_mode="r"), np.load(self.label, mmap_mode="r")
        return np.load(self.image), np.load(self.label)


# The code that turns a pair of files into cached arrays: loading and validating (io), orienting,
# cropping, normalising and resizing (preprocess). A change to any of them makes new cache files.
CACHED_BY: tuple[str, ...] = ("io", "preprocess")


def code_fingerprint(modules: Sequence[str] = CACHED_BY) -> str:
    """A hash of the source of the ``hipseg_lib`` modules that compute the cache (:data:`CACHED_BY`)."""
    h = hashlib.sha256()
    for name in modules:
        h.update((Path(__file__).with_name(f"{name}.py")).read_bytes())
    return h.hexdigest()


def _key(pair: Pair, cfg: Preprocessing) -> str:
    """The cache key: the source files (path, size, modification time), the preprocessing settings
    and the code that computes the cache, not a version number that does not move with it."""
    h = hashlib.sha256()
    for f in (pair.image, pair.label):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(code_fingerprint().encode())
    return h.hexdigest()[:16]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def _cache_one(pair: Pair, cfg: Preprocessing, stem: str) -> dict:
    """Load, validate and preprocess one pair; write its image, label and meta files. Returns the meta."""
    img_path, lab_path, meta_path = (Path(f"{stem}_{s}") for s in ("image.npy", "label.npy", "meta.json"))
    image, label = load_pair(pair)
    turn = reorient(image.affine, cfg.orientation)
    img_arr, lab_arr = turn.apply(image.array), turn.apply(label.array)
    spacing = turn.spacing(image.spacing)
    img, lab, where = preprocess_pair(img_arr, lab_arr, cfg, spacing, name=str(pair.image))
    assert lab is not None  # a label was given
    _save_npy_atomic(img_path, img)
    _save_npy_atomic(lab_path, lab)
    meta = {"spacing": list(spacing), "original_shape": list(img_arr.shape), "placement": where.to_dict()}
    with atomic_path(meta_path) as tmp:
        Path(tmp).write_text(json.dumps(meta))
    return meta


def _start_method() -> str:
    """fork on Linux, which needs nothing of the caller (a script without a ``__main__`` guard
    works); spawn once CUDA is initialised, since a forked child cannot use the parent's CUDA."""
    return "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"


def _one_thread() -> None:
    """A pool process's start: one core each, since the pool has as many processes as cores."""
    torch.set_num_threads(1)


def preprocessing_workers(n_jobs: int, limit: int | None = None) -> int:
    """Processes for preprocessing ``n_jobs`` volumes: the machine's cores (those this process may
    use), at most :data:`MAX_PREPROCESS_WORKERS` or ``limit``, never more than the jobs."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, limit or MAX_PREPROCESS_WORKERS, n_jobs))


# Preprocessing one volume is a few hundred MB of work arrays at the real size: 16 processes at
# most, which a 16-core GPU machine keeps busy and 128 GB holds.
MAX_PREPROCESS_WORKERS = 16


def cache_pairs(pairs: Sequence[Pair], cfg: Preprocessing, cache_dir: str | os.PathLike | None = None,
                progress: bool = False, workers: int | None = None) -> list[CachedVolume]:
    """Load, validate, preprocess and cache each pair (once); return the cached volumes.

    Pairs not cached yet are preprocessed by a pool of processes (:func:`preprocessing_workers`:
    the cores, capped; ``workers=1`` is serial). The files are the same bytes either way.

    Raises:
        HipsegError: a pair fails validation (message names the file).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{cache}: cannot create the cache folder ({exc.strerror})") from None
    stems = [str(cache / f"{pair.id}_{_key(pair, cfg)}") for pair in pairs]
    metas: dict[int, dict] = {}
    todo = []
    for n, stem in enumerate(stems):
        files = [Path(f"{stem}_{s}") for s in ("image.npy", "label.npy", "meta.json")]
        if all(f.exists() for f in files):
            metas[n] = json.loads(files[2].read_text())
        else:
            todo.append(n)
    bar = None
    if progress and todo:
        from .progress import progress as tqdm
        bar = tqdm(total=len(todo), desc="preprocess", unit="vol", leave=False)
    n_proc = preprocessing_workers(len(todo), workers)
    try:
        if n_proc > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(n_proc, mp_context=multiprocessing.get_context(_start_method()),
                                     initializer=_one_thread) as pool:
                futures = {pool.submit(_cache_one, pairs[n], cfg, stems[n]): n for n in todo}
                for fut in as_completed(futures):
                    metas[futures[fut]] = fut.result()
                    if bar is not None:
                        bar.update(1)
        else:
            for n in todo:
                metas[n] = _cache_one(pairs[n], cfg, stems[n])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out = []
    for n, pair in enumerate(pairs):
        meta = metas[n]
        out.append(CachedVolume(pair.id, Path(f"{stems[n]}_image.npy"), Path(f"{stems[n]}_label.npy"),
                                tuple(meta["spacing"]), tuple(meta["original_shape"]),
                                Placement.from_dict(meta["placement"]), pair))
    return out


class SegmentationDataset(Dataset):
    """Cached volumes as ``(image[1, X, Y, Z] float32, label[X, Y, Z] int64)`` tensors, as they are
    (validation, evaluation). Training draws its augmented batches from :class:`TrainingBatches`.

    Args:
        volumes: from :func:`cache_pairs`.
        in_memory: keep all arrays in RAM (small data sets); otherwise memory-map each read.
    """

    def __init__(self, volumes: Sequence[CachedVolume], in_memory: bool = True):
        self.volumes = list(volumes)
        self._arrays = [v.load(mmap=False) for v in self.volumes] if in_memory else None

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self._arrays[i] if self._arrays is not None else self.volumes[i].load(mmap=True)
        image = torch.from_numpy(np.array(img, dtype=np.float32))[None]  # a copy: a memory map is read-only
        label = torch.from_numpy(np.array(lab, dtype=np.int64))
        return image, label


class TrainingSet:
    """The preprocessed training volumes as two tensors, where batches are drawn from.

    ``where="device"``: on the training device for the whole run (on a GPU, images in bf16 and
    labels in uint8), so that a step takes its batch by index, with no worker processes and no
    copy from the host. ``"host"``: in host memory (pinned when the device is a GPU), copied to the
    device a batch at a time without blocking. ``"auto"``: the device when the volumes take at most
    a quarter of its free memory, else the host. On a CPU both are the same memory.

    Args:
        volumes: from :func:`cache_pairs`, all on one grid.
        device: where training runs.
        where: ``"auto"``, ``"device"`` or ``"host"``.

    Example:
        >>> ts = TrainingSet(vols, torch.device("cpu"))         # doctest: +SKIP
        >>> ts.where, ts.images.shape, ts.nbytes                 # doctest: +SKIP
    """

    def __init__(self, volumes: Sequence[CachedVolume], device: torch.device, where: str = "auto"):
        if where not in ("auto", "device", "host"):
            raise ValueError(f"where must be auto, device or host, got {where!r}")
        self.volumes = list(volumes)
        if not self.volumes:
            raise HipsegError("no training volumes")
        self.device = torch.device(device)
        loaded = [v.load(mmap=False) for v in self.volumes]
        shapes = {tuple(i.shape) for i, _ in loaded}
        if len(shapes) != 1:
            raise HipsegError(f"training volumes differ in shape: {sorted(shapes)}")
        self.shape = shapes.pop()
        image_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        per_volume = int(np.prod(self.shape)) * (image_dtype.itemsize + 1)
        self.nbytes = per_volume * len(self.volumes)
        if where == "auto":
            fits = self.device.type == "cpu" or self.nbytes <= available_bytes(self.device) // 4
            where = "device" if fits else "host"
        self.where = where
        home = self.device if where == "device" else torch.device("cpu")
        pin = where == "host" and self.device.type == "cuda"
        self.images = torch.empty((len(loaded), 1, *self.shape), dtype=image_dtype, pin_memory=pin)
        self.labels = torch.empty((len(loaded), *self.shape), dtype=torch.uint8, pin_memory=pin)
        for n, (img, lab) in enumerate(loaded):
            self.images[n, 0] = torch.from_numpy(np.asarray(img, dtype=np.float32))
            self.labels[n] = torch.from_numpy(np.asarray(lab, dtype=np.uint8))
        self.images, self.labels = self.images.to(home), self.labels.to(home)

    def __len__(self) -> int:
        return len(self.volumes)

    def spacing(self, i: int) -> tuple[float, float, float]:
        """Voxel size (mm) of volume ``i`` on the training grid (what rotations are made in)."""
        return self.volumes[i].grid_spacing

    def take(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32) and labels (int64) of ``indices`` on the training device."""
        index = host_to(torch.as_tensor(list(indices), dtype=torch.long), self.images.device)
        images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        return images.float(), labels.long()


class TrainingBatches:
    """The augmented training batches of each epoch, drawn from a :class:`TrainingSet` and
    augmented where they are (the GPU with the ``full`` preset, the CPU with ``cpu``).

    The order is :class:`~torch.utils.data.DistributedSampler`'s (shuffled by ``seed`` and the epoch,
    split over ``world`` processes, the remainder dropped), so a run on N processes sees the same
    global batches as one process. Sample ``i`` of epoch ``e`` is cut (``patch``) and augmented
    with parameters from ``np.random.default_rng([seed, e, i])``: the same batches for the same
    epoch, other batches in another epoch, on any number of processes.

    Args:
        train_set: the volumes.
        batch_size: samples per step (per process).
        seed: shuffling and augmentation seed.
        augmentation: e.g. :class:`~hipseg_lib.augment.RandomAugmentation`, or None.
        patch: e.g. :class:`~hipseg_lib.augment.RandomPatch`, or None for whole volumes.
        rank, world: this process and how many train.
    """

    def __init__(self, train_set: TrainingSet, batch_size: int, seed: int = 0, augmentation=None, patch=None,
                 rank: int = 0, world: int = 1):
        from torch.utils.data import DistributedSampler

        self.train_set, self.batch_size, self.seed = train_set, batch_size, seed
        self.augmentation, self.patch = augmentation, patch
        indices: Sequence[int] = range(len(train_set))  # all the sampler needs of a dataset is its length
        self.sampler: DistributedSampler = DistributedSampler(indices, num_replicas=world,  # type: ignore[arg-type]
                                                              rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // batch_size

    def order(self, epoch: int) -> list[list[int]]:
        """The volume indices of each of this process's batches in ``epoch``."""
        self.sampler.set_epoch(epoch)  # another shuffle every epoch
        idx = list(iter(self.sampler))
        n = self.batch_size
        return [idx[k * n:(k + 1) * n] for k in range(self.steps_per_epoch)]

    def batch(self, epoch: int, indices: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``(images (N, 1, X, Y, Z) float32, labels (N, X, Y, Z)
        int64)`` on the device."""
        from .augment import augment_batch

        images, labels = self.train_set.take(indices)  # already preprocessed
        # one generator per sample: the same draws for (seed, epoch, sample)
        rngs = [np.random.default_rng([self.seed, epoch, i]) for i in indices]
        if self.patch is not None:  # a random window of each volume
            cut = [self.patch.sample(r, lab)(img, lab)
                   for r, img, lab in zip(rngs, images, labels)]
            images = torch.stack([c[0] for c in cut])
            labels = torch.stack([c[1] for c in cut])
        if self.augmentation is not None:
            augs = [self.augmentation.sample(r, self.train_set.spacing(i))
                    for r, i in zip(rngs, indices)]
            images, labels = augment_batch(images, labels, augs)
        return images, labels

    def epoch(self, epoch: int):
        """Yield this process's batches of ``epoch``, in order."""
        for indices in self.order(epoch):
            yield self.batch(epoch, indices)


def _crop_geometry(pair: Pair, cfg: Preprocessing) -> list[float]:
    """The oriented spacing (mm) of ``pair``'s image and the extent (mm) of its body crop: six numbers."""
    from .io import load_volume

    image = load_volume(pair.image, "image")
    turn = reorient(image.affine, cfg.orientation)
    arr = turn.apply(image.array)
    spacing = turn.spacing(image.spacing)
    box = foreground_box(arr) if cfg.crop_foreground else tuple((0, n) for n in arr.shape)
    return list(spacing) + [(b - a) * s for (a, b), s in zip(box, spacing)]


def plan_target_spacing(pairs: Sequence[Pair], cfg: Preprocessing, cache_dir: str | os.PathLike | None = None,
                        ) -> tuple[float, float, float]:
    """The voxel size (mm) every body crop is resampled to with ``resample="spacing"``, planned from
    the training ``pairs`` as nnU-Net plans it: their median spacing, made coarser along an axis where
    the largest body crop (in mm) would not fit in ``cfg.target_shape`` voxels. No training scan is
    then cut; a larger scan met later is cut at the grid's edge in training, never in prediction.
    The plan is cached (the files, the settings and this code decide it).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    h = hashlib.sha256()
    for pair in pairs:
        st = pair.image.stat()
        h.update(f"{pair.image.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps({k: v for k, v in cfg.to_dict().items() if k != "target_spacing"}, sort_keys=True).encode())
    h.update(code_fingerprint().encode())
    path = cache / f"spacing-plan_{h.hexdigest()[:16]}.json"
    if path.exists():
        return tuple(json.loads(path.read_text())["target_spacing"])
    if not pairs:
        raise HipsegError("cannot plan a target spacing without training scans")
    rows = np.array([_crop_geometry(p, cfg) for p in pairs])
    median, largest = np.median(rows[:, :3], axis=0), rows[:, 3:].max(axis=0)
    spacing = tuple(round(float(max(m, e / n)), 3) for m, e, n in zip(median, largest, cfg.target_shape))
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"target_spacing": spacing, "median_spacing": median.tolist(),
                                         "largest_crop_mm": largest.tolist(), "scans": len(pairs)}))
    return spacing  # type: ignore[return-value]


def with_planned_spacing(cfg, data_dir: str | os.PathLike):
    """``cfg`` (a ``TrainConfig``) with its ``target_spacing`` planned from the training cases of
    ``data_dir`` (:func:`plan_target_spacing`), when it resamples to a spacing not planned yet;
    otherwise ``cfg`` itself. Training stores the planned value in its checkpoints."""
    prep = cfg.preprocessing
    if prep.resample != "spacing" or prep.target_spacing is not None:
        return cfg
    train_pairs = split_folder(data_dir, cfg.split_seed)["train"]
    return cfg.replace(target_spacing=plan_target_spacing(train_pairs, prep, cfg.cache_dir))


def load_split_volumes(data_dir: str | os.PathLike, cfg, progress: bool = False) -> dict[str, list[CachedVolume]]:
    """:func:`split_folder` with ``cfg.split_seed``, each part preprocessed with ``cfg.preprocessing``
    (cached, its target spacing planned first where needed: :func:`with_planned_spacing`):
    ``{"train": [...], "val": [...], "test": [...]}``. ``cfg`` is a ``TrainConfig``."""
    cfg = with_planned_spacing(cfg, data_dir)
    return {name: cache_pairs(pairs, cfg.preprocessing, cfg.cache_dir, progress=progress)
            for name, pairs in split_folder(data_dir, cfg.split_seed).items()}
