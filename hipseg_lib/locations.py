"""Where things are: the project folder, the data a chapter or command reads, output folders.

One policy for the chapters, the command line and the benchmarks.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import HipsegError

__all__ = ["project_root", "resolve_data_dir", "resolve_output_dir"]


def project_root() -> Path:
    """The folder holding ``_config.yml``: ``$HIPSEG_ROOT``, else the nearest one above the
    working directory, else the one above this package (an editable install)."""
    if os.environ.get("HIPSEG_ROOT"):
        return Path(os.environ["HIPSEG_ROOT"]).resolve()
    for d in [Path.cwd(), *Path.cwd().parents]:
        if (d / "_config.yml").exists() and (d / "book").is_dir():
            return d
    return Path(__file__).resolve().parents[1]


def resolve_data_dir(data_dir: str | os.PathLike | None = None, make_default: bool = True) -> Path:
    """The data folder a chapter should read.

    One policy for the chapters, the command line and the benchmarks. Order: the ``data_dir``
    argument, ``$HIPSEG_DATA``, else the default synthetic set ``<project>/data/synthetic``,
    generated on first use (with a message) when ``make_default``. A default set made by an
    older generator (:func:`hipseg_lib.synth.anatomy_of`) is moved aside to
    ``data/synthetic.anatomy-N`` and made anew, with a message. Outside a project checkout
    there is no default: a one-line error says to point ``--data`` at a folder.
    """
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise HipsegError(f"{path}: no such folder")
        return path.resolve()
    if os.environ.get("HIPSEG_DATA"):
        return resolve_data_dir(os.environ["HIPSEG_DATA"])
    root = project_root()
    if not (root / "_config.yml").exists():
        raise HipsegError(f"no hipseg project checkout above {Path.cwd()}: point --data (or $HIPSEG_DATA) "
                          "at a data folder, or run inside the project")
    default = root / "data" / "synthetic"
    from .synth import ANATOMY, anatomy_of, make_dataset

    found = anatomy_of(default)
    if found is not None and found != ANATOMY:
        if not make_default:
            raise HipsegError(f"{default}: made by an older generator (anatomy {found}, now {ANATOMY}); "
                              "run `make data` first")
        aside = _free_name(default.with_name(f"{default.name}.anatomy-{found}"))
        print(f"{default} was made by an older generator (anatomy {found}, now {ANATOMY}): "
              f"moving it to {aside} and making it anew")
        default.rename(aside)
    if not default.exists():
        if not make_default:
            raise HipsegError(f"{default}: no data yet; make it first with `hipseg synth --out {default}`")
        print(f"making the default synthetic data set in {default} ...")
        make_dataset(default)
    return default


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist."""
    k, free = 1, path
    while free.exists():
        k += 1
        free = path.with_name(f"{path.name}-{k}")
    return free


def resolve_output_dir(path: str | os.PathLike | None, default: str) -> Path:
    """``path`` if given, else ``<project>/<default>``."""
    return Path(path).expanduser().resolve() if path else project_root() / default
