"""Case-level splitting, a preprocessing cache, and the torch Dataset.

Decoding a 256x256x128 ``.nii.gz`` takes ~160 ms, so each pair is preprocessed once and
stored as ``.npy`` (~3 ms to load, memory-mapped); the cache key covers the source files
(path, size, modification time), the preprocessing settings and the library version.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import HipsegError, __version__
from ._atomic import atomic_path
from .io import Pair, VolumeId, find_pairs, load_pair
from .preprocess import Preprocessing, preprocess_pair, reorient

__all__ = [
    "split_by_case", "split_folder", "cases_of", "default_cache_dir", "CachedVolume", "cache_pairs",
    "load_split_volumes", "SegmentationDataset",
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
    turned to the preprocessing orientation, ``box`` the body crop, before resizing."""

    id: VolumeId
    image: Path
    label: Path
    spacing: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    pair: Pair

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        mode = "r" if mmap else None
        return np.load(self.image, mmap_mode=mode), np.load(self.label, mmap_mode=mode)


def _key(pair: Pair, cfg: Preprocessing) -> str:
    h = hashlib.sha256()
    for f in (pair.image, pair.label):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    h.update(__version__.encode())
    return h.hexdigest()[:16]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def cache_pairs(pairs: Sequence[Pair], cfg: Preprocessing, cache_dir: str | os.PathLike | None = None,
                progress: bool = False) -> list[CachedVolume]:
    """Load, validate, preprocess and cache each pair (once); return the cached volumes.

    Raises:
        HipsegError: a pair fails validation (message names the file).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{cache}: cannot create the cache folder ({exc.strerror})") from None
    it: Iterable[Pair] = pairs
    if progress:
        from .progress import progress as tqdm
        it = tqdm(pairs, desc="preprocess", unit="vol", leave=False)
    out = []
    for pair in it:
        key = _key(pair, cfg)
        stem = cache / f"{pair.id}_{key}"
        img_path, lab_path, meta_path = (Path(f"{stem}_{s}") for s in ("image.npy", "label.npy", "meta.json"))
        if meta_path.exists() and img_path.exists() and lab_path.exists():
            meta = json.loads(meta_path.read_text())
        else:
            image, label = load_pair(pair)
            turn = reorient(image.affine, cfg.orientation)
            img_arr, lab_arr = turn.apply(image.array), turn.apply(label.array)
            img, lab, box = preprocess_pair(img_arr, lab_arr, cfg, name=str(pair.image))
            _save_npy_atomic(img_path, img)
            _save_npy_atomic(lab_path, lab)
            meta = {"spacing": list(turn.spacing(image.spacing)), "original_shape": list(img_arr.shape),
                    "box": [list(b) for b in box]}
            with atomic_path(meta_path) as tmp:
                Path(tmp).write_text(json.dumps(meta))
        out.append(CachedVolume(pair.id, img_path, lab_path, tuple(meta["spacing"]),
                                tuple(meta["original_shape"]), tuple(tuple(b) for b in meta["box"]), pair))
    return out


class SegmentationDataset(Dataset):
    """Cached volumes as ``(image[1, X, Y, Z] float32, label[X, Y, Z] int64)`` tensors.

    Augmentation is random but replayable: sample ``i`` in epoch ``e`` draws its parameters
    from ``np.random.default_rng([seed, e, i])``, whatever worker or rank loads it. Call
    :meth:`set_epoch` at the start of each epoch.

    Args:
        volumes: from :func:`cache_pairs`.
        augmentation: a random transform with ``sample(rng)`` (e.g. ``default_augmentation()``), or None.
        seed: base seed of the augmentation.
        in_memory: keep all arrays in RAM (small data sets); otherwise memory-map each read.
        patch: a random box with ``sample(rng, label) -> Crop`` (e.g. ``RandomPatch``), cut
            before the augmentation; None: whole volumes.
    """

    def __init__(self, volumes: Sequence[CachedVolume], augmentation=None, seed: int = 0,
                 in_memory: bool = True, patch=None):
        self.volumes = list(volumes)
        self.augmentation = augmentation
        self.patch = patch
        self.seed = seed
        self.epoch = 0
        self._arrays = [v.load(mmap=False) for v in self.volumes] if in_memory else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self._arrays[i] if self._arrays is not None else self.volumes[i].load(mmap=True)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if self.patch is not None:
            img, lab = self.patch.sample(rng, np.asarray(lab))(np.asarray(img), np.asarray(lab))
        if self.augmentation is not None:
            t = self.augmentation.sample(rng)
            img, lab = t(np.asarray(img), np.asarray(lab))
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        label = torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))
        return image, label


def load_split_volumes(data_dir: str | os.PathLike, cfg, progress: bool = False) -> dict[str, list[CachedVolume]]:
    """:func:`split_folder` with ``cfg.split_seed``, each part preprocessed with ``cfg.preprocessing``
    (cached): ``{"train": [...], "val": [...], "test": [...]}``. ``cfg`` is a ``TrainConfig``."""
    return {name: cache_pairs(pairs, cfg.preprocessing, cfg.cache_dir, progress=progress)
            for name, pairs in split_folder(data_dir, cfg.split_seed).items()}
