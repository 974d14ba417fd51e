"""Benchmark: augmented training volumes per second, and whether that keeps a modern GPU fed.

At the ``full`` preset's grid and the ``cpu`` preset's, side by side in one run:

- ``scipy``: hipseg's pipeline before this one (``scipy_pipeline.py``: scipy transforms on numpy,
  one volume at a time, in DataLoader workers), with 1, 2 and 4 worker processes;
- ``nnU-Net``: batchgeneratorsv2's default training transforms as ``nnUNetTrainer`` builds them,
  per volume on CPU tensors in DataLoader workers (installed into a cache folder on first use,
  never a hipseg dependency);
- ``hipseg device``: ``hipseg_lib.data.TrainingBatches``: the volumes resident where training
  runs, a batch drawn by index and augmented as one batch there: on the CPU, and on CUDA when present;
- ``MONAI``: the nearest set of MONAI's transforms on the same resident tensors, sample by sample
  (MONAI is pinned for the benchmarks), on the CPU and on CUDA.

Beside them: the FLOPs of one training step of the preset (counted by PyTorch) and the step time
that implies at 10, 20 and 40 % of an H100/H200's dense bf16 peak, so the table says how many
augmented volumes per second such a card eats, and whether each pipeline keeps up.

    .venv/bin/python benchmarks/bench_loader.py                 # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_loader.py --grids cpu --pipelines device   # seconds

Writes ``benchmarks/results/loader_<device>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import markdown_line, provenance  # noqa: E402

from hipseg_lib.augment import RandomAugmentation  # noqa: E402
from hipseg_lib.config import make_config  # noqa: E402
from hipseg_lib.data import TrainingBatches, TrainingSet, cache_pairs, split_folder  # noqa: E402
from hipseg_lib.plan import BF16_PEAK_TFLOPS, step_flops  # noqa: E402

BGV2 = "batchgeneratorsv2==0.3.6"
# what batchgeneratorsv2's transforms import beyond torch, numpy and scipy (its blur imports skimage,
# its spatial transform pandas)
BGV2_NEEDS = ("scikit-image==0.26.0", "lazy_loader==0.6", "imageio==2.38.1", "tifffile==2026.3.3", "networkx==3.6.1",
              "pandas==3.1.1", "tzdata==2026.6")
MFUS = (0.10, 0.20, 0.40)
PEAK = BF16_PEAK_TFLOPS["H100 SXM"]  # = H200's: the same tensor cores


def import_bgv2(cache: Path):
    """batchgeneratorsv2 and what its transforms import, installed without their other dependencies
    (torch, numpy and scipy are here) into ``cache`` on first use."""
    target = cache / "bench-packages" / BGV2.replace("==", "-")
    sys.path.insert(0, str(target))
    try:
        import batchgeneratorsv2  # noqa: F401
        import skimage  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(target), BGV2, *BGV2_NEEDS], check=True)
        import importlib

        sys.path_importer_cache.pop(str(target), None)  # the folder did not exist when first looked at
        importlib.invalidate_caches()
        import batchgeneratorsv2  # noqa: F401
    return str(target)


def nnunet_transforms(patch_size):
    """nnU-Net v2's default training transforms (``nnUNetTrainer.get_training_transforms`` of nnunetv2
    2.8, 3D, no deep-supervision downsampling), built from batchgeneratorsv2."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    rot = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    return ComposeTransforms([
        SpatialTransform(patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=rot, p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                         border_mode_seg="constant", padding_value_seg=-1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
        RemoveLabelTansform(-1, 0),
    ])


class NnUNetDataset(torch.utils.data.Dataset):
    """Cached volumes through nnU-Net's transforms, one at a time (as its data loader workers do)."""

    def __init__(self, volumes, bgv2_path: str):
        self.arrays = [v.load(mmap=False) for v in volumes]
        self.bgv2_path = bgv2_path
        self.transforms = None

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int):
        if self.transforms is None:  # built in the worker (its path added there too)
            sys.path.insert(0, self.bgv2_path)
            self.transforms = nnunet_transforms(tuple(self.arrays[0][0].shape))
        img, lab = self.arrays[i]
        out = self.transforms(image=torch.from_numpy(np.array(img, np.float32))[None],
                              segmentation=torch.from_numpy(np.array(lab, np.int16))[None])
        return out["image"], out["segmentation"][0].long()


def monai_transforms(device):
    """The nearest MONAI 1.6 equivalent of the set, on tensors where they are (``device``), one
    sample at a time (MONAI's transforms take one sample): its rotation and scaling as one
    resampling, noise, smoothing, intensity scaling, low resolution, gamma (of the inverted image
    too), mirroring, with nnU-Net's probabilities."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandSimulateLowResolutiond,
    )

    keys = ["image", "label"]
    rot = math.radians(30)
    return Compose([
        RandAffined(keys, prob=0.36, rotate_range=(rot, rot, rot), scale_range=(0.35, 0.35, 0.35),
                    mode=("bilinear", "nearest"), padding_mode="zeros", device=device),
        RandGaussianNoised("image", prob=0.1, std=0.1),
        RandGaussianSmoothd("image", prob=0.1, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandSimulateLowResolutiond("image", prob=0.125, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd("image", prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
    ]).set_random_state(seed=0)


def time_monai(volumes_list, device, batch_size: int, seconds: float) -> float:
    """Volumes per second of MONAI's transforms on resident tensors on ``device``, sample by sample."""
    ts = TrainingSet(volumes_list, device)
    transforms = monai_transforms(device)

    def forever():
        while True:
            for i in range(0, len(ts) - batch_size + 1, batch_size):
                images, labels = ts.take(range(i, i + batch_size))
                out = [transforms({"image": x, "label": y[None].float()}) for x, y in zip(images, labels)]
                yield torch.stack([torch.as_tensor(o["image"]) for o in out]), None

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return _rate(forever(), seconds, 4 * batch_size, sync)


class Repeated(torch.utils.data.Dataset):
    """``dataset`` repeated to ``length`` items, so that one pass keeps every worker busy."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


def _rate(batches, min_seconds: float, min_volumes: int, sync=lambda: None) -> float:
    """Volumes per second from an iterator of batches, after its first batch (start-up), over at
    least ``min_seconds`` and ``min_volumes``."""
    done, t = 0, None
    for images, _ in batches:
        sync()
        if t is None:
            t = time.perf_counter()
            continue
        done += images.shape[0]
        if done >= min_volumes and time.perf_counter() - t >= min_seconds:
            return done / (time.perf_counter() - t)
    raise RuntimeError("the loader ran out of batches before the timing was done")


def time_loader(dataset, batch_size: int, workers: int, seconds: float) -> float:
    """Volumes per second of a DataLoader over ``dataset`` with ``workers`` processes."""
    loader = torch.utils.data.DataLoader(Repeated(dataset, 100_000), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    return _rate(iter(loader), seconds, 2 * workers * batch_size)


def time_device(volumes_list, device, batch_size: int, seconds: float) -> float:
    """Volumes per second of ``TrainingBatches`` (resident, augmented on ``device``)."""
    batches = TrainingBatches(TrainingSet(volumes_list, device), batch_size, seed=0, augmentation=RandomAugmentation())

    def forever():
        epoch = 0
        while True:
            yield from batches.epoch(epoch)
            epoch += 1

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return _rate(forever(), seconds, 4 * batch_size, sync)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data folder (default: the project's synthetic set)")
    p.add_argument("--grids", nargs="+", default=["full", "cpu"], choices=["full", "cpu"])
    p.add_argument("--pipelines", nargs="+", default=["scipy", "nnunet", "device", "monai"],
                   choices=["scipy", "nnunet", "device", "monai"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--volumes", type=int, default=8, help="training volumes to preprocess per grid")
    p.add_argument("--seconds", type=float, default=3.0, help="at least this long to time each row")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/loader_<device>.md)")
    a = p.parse_args(argv)
    from hipseg_lib.data import default_cache_dir
    from hipseg_lib.locations import ensure_default_dataset

    data = ensure_default_dataset(a.data)
    cache = default_cache_dir()
    train_pairs = split_folder(data)["train"][: a.volumes]
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    rows, plans, notes = [], {}, []
    for grid in a.grids:
        cfg = make_config(grid)
        vols = cache_pairs(train_pairs, cfg.preprocessing, cache)
        flops = step_flops(cfg)
        plans[grid] = {"grid": "x".join(map(str, cfg.preprocessing.target_shape)), "batch": cfg.batch_size,
                       "tflop_per_step": flops / 1e12,
                       "needed_volumes_per_s": {f"{int(100 * m)} %": cfg.batch_size / (flops / (m * PEAK * 1e12))
                                                for m in MFUS}}
        b = cfg.batch_size

        def row(name, rate, grid=grid):
            rows.append({"grid": grid, "pipeline": name, "volumes_per_s": rate, "s_per_volume": 1 / rate})
            print(f"{grid:>4} {name:<34} {rate:8.2f} volumes/s  ({1000 / rate:7.1f} ms per volume)", flush=True)

        if "device" in a.pipelines:
            for device in devices:
                row(f"hipseg device ({device.type})", time_device(vols, device, b, a.seconds))
        if "monai" in a.pipelines:
            for device in devices:
                row(f"MONAI transforms ({device.type})", time_monai(vols, device, b, a.seconds))
        if "scipy" in a.pipelines:
            from scipy_pipeline import ScipyAugmentedDataset

            ds = ScipyAugmentedDataset(vols)
            for w in a.workers:
                row(f"scipy, {w} worker{'s' if w > 1 else ''}", time_loader(ds, b, w, a.seconds))
        if "nnunet" in a.pipelines:
            try:
                path = import_bgv2(cache)
            except Exception as exc:  # e.g. no registry on a GPU machine and no wheel carried
                notes.append(f"nnU-Net's pipeline not measured: batchgeneratorsv2 not importable ({exc})")
                print(notes[-1], flush=True)
                continue
            ds = NnUNetDataset(vols, path)
            for w in a.workers:
                row(f"nnU-Net (batchgeneratorsv2), {w} worker{'s' if w > 1 else ''}", time_loader(ds, b, w, a.seconds))
    prov = provenance([__file__, *argv])
    write(rows, plans, prov, a.out, notes)
    return 0


def write(rows, plans, prov, out=None, notes=()) -> Path:
    slug = "cuda" if prov["gpu"] else "cpu"
    path = Path(out) if out else ROOT / "benchmarks" / "results" / f"loader_{slug}.md"
    lines = ["# Augmented training volumes per second", "",
             markdown_line(prov), "",
             f"What a GPU eats: the step's FLOPs (PyTorch's count) at a share of {PEAK:.0f} TFLOP/s "
             "(H100 SXM / H200 dense bf16), as augmented volumes per second:", "",
             "| grid | batch | TFLOP per step | " + " | ".join(f"at {int(100 * m)} % MFU" for m in MFUS) + " |",
             "|---|---|---|" + "---|" * len(MFUS)]
    for grid, pl in plans.items():
        lines.append(f"| {grid} ({pl['grid']}) | {pl['batch']} | {pl['tflop_per_step']:.3f} | "
                     + " | ".join(f"{v:.0f} vol/s" for v in pl["needed_volumes_per_s"].values()) + " |")
    lines += ["", "| grid | pipeline | volumes/s | ms per volume | share of the 10 % MFU need |",
              "|---|---|---|---|---|"]
    for r in rows:
        need = plans[r["grid"]]["needed_volumes_per_s"]["10 %"]
        lines.append(f"| {r['grid']} | {r['pipeline']} | {r['volumes_per_s']:.2f} | {1000 * r['s_per_volume']:.1f} | "
                     f"{100 * r['volumes_per_s'] / need:.0f} % |")
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"provenance": prov, "plans": plans, "rows": rows}, indent=2))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
