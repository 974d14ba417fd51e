"""nnU-Net's own dataset integrity check on the output of ``hipseg convert --to nnunet``.

nnunetv2 is never a hipseg dependency (its requirements would pull another torch build). This
script installs it without dependencies into a cache folder, with the few packages its integrity
check imports, as ``bench_loader.py`` does for batchgeneratorsv2, converts a data folder (default:
the project's synthetic set) and runs ``nnunetv2.experiment_planning.verify_dataset_integrity``
on it, as ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` would. Exits 0 when nnU-Net
accepts the dataset.

    python benchmarks/nnunet_check.py [--data DIR] [--out benchmarks/results/nnunet_check.md]
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import markdown_line, provenance  # noqa: E402

NNUNET = "nnunetv2==2.8.1"
# what verify_dataset_integrity imports beyond torch, numpy, scipy and nibabel
NEEDS = ("batchgenerators==0.25.5", "acvl_utils==0.2.6", "simpleitk==2.5.7", "pandas==3.1.1", "tzdata==2026.6",
         "scikit-image==0.26.0", "lazy_loader==0.6", "imageio==2.38.1", "tifffile==2026.3.3", "networkx==3.6.1",
         "connected-components-3d==4.1.1", "blosc2==4.14.1", "ndindex==1.10.1", "msgpack==1.2.4",
         "numexpr==2.14.2", "threadpoolctl==3.8.0")


def import_nnunet(cache: Path) -> Path:
    target = cache / "bench-packages" / NNUNET.replace("==", "-")
    sys.path.insert(0, str(target))
    try:
        import nnunetv2.experiment_planning.verify_dataset_integrity  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(target), NNUNET, *NEEDS], check=True)
        sys.path_importer_cache.pop(str(target), None)
        importlib.invalidate_caches()
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a hipseg data folder (default: the project's synthetic set)")
    p.add_argument("--out", default=None, help="also write the outcome here (Markdown)")
    a = p.parse_args()
    from hipseg_lib.convert import to_nnunet
    from hipseg_lib.locations import default_cache_dir, ensure_default_dataset

    data = ensure_default_dataset(a.data)
    raw = Path(tempfile.mkdtemp(prefix="nnunet-raw-"))
    os.environ["nnUNet_raw"] = str(raw)
    dataset = raw / "Dataset501_HipMRI"
    t = time.perf_counter()
    counts = to_nnunet(data, dataset)
    convert_s = time.perf_counter() - t
    import_nnunet(default_cache_dir())
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    t = time.perf_counter()
    verify_dataset_integrity(str(dataset), num_processes=2)  # raises on any problem
    verify_s = time.perf_counter() - t
    text = "\n".join([
        "# nnU-Net's integrity check on `hipseg convert --to nnunet`", "", markdown_line(provenance()), "",
        f"Data: `{data}`. `hipseg convert` wrote {counts['train'] + counts['val']} training volumes "
        f"(fold 0: {counts['train']} train, {counts['val']} val) and {counts['test']} test volumes in "
        f"{convert_s:.1f} s; `{NNUNET}`'s `verify_dataset_integrity` accepted the dataset in {verify_s:.1f} s "
        "(every image has its label, the same geometry, only the declared labels, no NaN).", ""])
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
