"""hipseg_lib: the library behind the hipseg tutorial book.

Data loading and checks for the HipMRI study layout, a synthetic stand-in data set,
preprocessing and augmentation, a residual 3D U-Net, Dice + cross-entropy loss,
segmentation metrics, training, prediction and evaluation.
"""
from __future__ import annotations

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("background", "body", "bones", "bladder", "rectum", "prostate")
NUM_CLASSES: int = len(CLASS_NAMES)
# Named class indices, so that code reads ``label == PROSTATE`` rather than ``label == 5``.
BACKGROUND, BODY, BONES, BLADDER, RECTUM, PROSTATE = range(NUM_CLASSES)
# Inference defaults (hipseg predict, chapter 5), chosen by chapter 5's measurement on the test
# cases; kept here, free of torch, so that the command line's --help stays instant.
DEFAULT_TTA: bool = True
DEFAULT_POSTPROCESS: bool = False


class HipsegError(Exception):
    """A problem with user input, reported as one line without a traceback."""


__all__ = ["__version__", "CLASS_NAMES", "NUM_CLASSES", "HipsegError",
           "BACKGROUND", "BODY", "BONES", "BLADDER", "RECTUM", "PROSTATE",
           "DEFAULT_TTA", "DEFAULT_POSTPROCESS"]
