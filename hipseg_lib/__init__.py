"""hipseg_lib: the library behind the hipseg tutorial book.

Data loading and checks for the HipMRI study layout, a synthetic stand-in data set,
preprocessing and augmentation, a residual 3D U-Net, Dice + cross-entropy loss,
segmentation metrics, training, prediction and evaluation.
"""
from __future__ import annotations

import os

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = (
    "background", "body", "bones", "bladder", "rectum", "prostate")
NUM_CLASSES: int = len(CLASS_NAMES)
# Named class indices, so that code reads ``label == PROSTATE`` rather
# than ``label == 5``.
BACKGROUND, BODY, BONES, BLADDER, RECTUM, PROSTATE = range(NUM_CLASSES)
# What a training run writes to its folder (the best checkpoint keeps the seed's file name).
BEST_NAME = "new_model.pth"
LAST_NAME = "last.pth"
LOG_NAME = "train_log.jsonl"
# The one precision vocabulary, for training and prediction alike (runtime.py
# resolves it; the command line offers it).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def available_cpus() -> int:
    """The CPUs this process may run on: a batch system's share of a node
    (Slurm's, through the affinity mask), not the node's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        return os.cpu_count() or 1


class HipsegError(Exception):
    """A problem with user input, reported as one line without a traceback. The library states the
    problem; ``cli_hint`` (if any) is what the command line adds: the flag that changes it."""

    cli_hint: str = ""

    def __init__(self, *args, cli_hint: str | None = None):
        super().__init__(*args)
        if cli_hint is not None:
            self.cli_hint = cli_hint


class SettingsError(HipsegError, ValueError):
    """A bad setting (of the network, the preprocessing, training or inference): an unknown name or
    preset, or a value out of range. One type for all of them: a ``ValueError`` for code, one line
    at the command line."""


class OutputExists(HipsegError):
    """An output file is there already and was not to be replaced."""

    cli_hint = "use --overwrite to replace it"

    def __init__(self, path):
        super().__init__(f"{path}: already exists")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type's name when empty), cut to ``limit``
    characters: what a one-line error quotes of an underlying failure."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


__all__ = ["__version__", "CLASS_NAMES", "NUM_CLASSES", "HipsegError", "SettingsError", "OutputExists", "first_line",
           "BACKGROUND", "BODY", "BONES", "BLADDER", "RECTUM", "PROSTATE",
           "BEST_NAME", "LAST_NAME", "LOG_NAME", "PRECISIONS"]
