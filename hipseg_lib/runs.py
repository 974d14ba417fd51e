"""A training run's folder: its files, checks before any work, and keeping earlier runs.

A run folder holds ``new_model.pth`` (best validation Dice), ``last.pth`` (every epoch; what a
resume continues from) and ``train_log.jsonl`` (one line per epoch): the names are
:data:`~hipseg_lib.BEST_NAME`, :data:`~hipseg_lib.LAST_NAME` and :data:`~hipseg_lib.LOG_NAME`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import BEST_NAME, LAST_NAME, LOG_NAME, HipsegError
from ._atomic import atomic_path

__all__ = ["archive_previous_run", "check_run_folder", "prepare_run_folder", "write_log"]


def archive_previous_run(out_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's checkpoints and log into ``out_dir/previous/<time>/`` (nothing is deleted).

    Returns:
        The archive folder, or None when ``out_dir`` held no earlier run.
    """
    out = Path(out_dir)
    files = [out / n for n in (BEST_NAME, LAST_NAME, LOG_NAME) if (out / n).exists()]
    if not files:
        return None
    dest = out / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for f in files:
        os.replace(f, dest / f.name)
    return dest


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse, before any work, a folder that would lose a run or that cannot be written.

    Without ``resume``, a folder holding checkpoints is refused (nothing is overwritten); with
    it, ``last.pth`` must exist.
    """
    last, best = out / LAST_NAME, out / BEST_NAME
    if not resume and (last.exists() or best.exists()):
        raise HipsegError(f"{out}: holds checkpoints of an earlier run; resume it (--resume) "
                          "or choose another output folder")
    if resume and not last.exists():
        raise HipsegError(f"{last}: nothing to resume (no such checkpoint)")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HipsegError(f"{out}: cannot create the output folder ({probe} is a file)")
    if not os.access(probe, os.W_OK):
        raise HipsegError(f"{out}: output folder is not writable")


def prepare_run_folder(out: Path) -> None:
    """Create the folder; remove temporary files a killed process left (complete files are intact)."""
    for stale in out.glob(".*.tmp") if out.is_dir() else []:
        stale.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HipsegError(f"{out}: cannot create the output folder ({exc.strerror})") from None


def write_log(out: Path, history: list[dict]) -> None:
    """Rewrite ``train_log.jsonl`` from the whole history, so it never disagrees with the checkpoint."""
    with atomic_path(out / LOG_NAME) as tmp:
        Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history))
