"""Where things are: the project folder, the data a chapter or command reads, output folders.

One policy for the chapters, the command line and the benchmarks.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import HipsegError

__all__ = ["project_root", "resolve_data_dir", "default_data_dir", "ensure_default_dataset", "resolve_output_dir",
           "default_cache_dir"]


def project_root() -> Path:
    """The folder holding ``_config.yml``: ``$HIPSEG_ROOT``, else the nearest one above the
    working directory, else the one above this package (an editable install)."""
    if os.environ.get("HIPSEG_ROOT"):
        return Path(os.environ["HIPSEG_ROOT"]).resolve()
    for d in [Path.cwd(), *Path.cwd().parents]:
        if (d / "_config.yml").exists() and (d / "book").is_dir():
            return d
    return Path(__file__).resolve().parents[1]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder a chapter or command reads; it only resolves, it makes nothing.

    Order: the ``data_dir`` argument, ``$HIPSEG_DATA``, else the default synthetic set
    ``<project>/data/synthetic``, which must exist and be of the current generator (make or renew it
    with :func:`ensure_default_dataset`: ``make data``, ``make book``, ``make lab`` and the command
    line do). Outside a project checkout there is no default: a one-line error says to point
    ``--data`` at a folder.
    """
    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise HipsegError(f"{path}: no such folder")
        return path.resolve()
    if os.environ.get("HIPSEG_DATA"):
        return resolve_data_dir(os.environ["HIPSEG_DATA"])
    from .synth import ANATOMY, anatomy_of

    default = default_data_dir()
    found = anatomy_of(default)
    if found is None:
        raise HipsegError(f"{default}: no data yet (ensure_default_dataset() makes it)",
                          cli_hint=f"make it first: hipseg synth --out {default}, or make data")
    if found != ANATOMY:
        raise HipsegError(f"{default}: made by an older generator (anatomy {found}, now {ANATOMY}; "
                          "ensure_default_dataset() renews it)",
                          cli_hint="renew it first: make data")
    return default


def default_data_dir() -> Path:
    """``<project>/data/synthetic``, where the default synthetic set lives (whether it exists or not)."""
    root = project_root()
    if not (root / "_config.yml").exists():
        raise HipsegError(f"no hipseg project checkout above {Path.cwd()} and no data folder given "
                          "(the data folder argument or $HIPSEG_DATA)",
                          cli_hint="point --data at a data folder")
    return root / "data" / "synthetic"


def ensure_default_dataset(data_dir: str | os.PathLike | None = None, log=print) -> Path:
    """The folder :func:`resolve_data_dir` gives, with the default synthetic set made first when it is
    the one asked for and missing (with a message), or moved aside to ``data/synthetic.anatomy-N`` and
    made anew when an older generator made it (:func:`hipseg_lib.synth.anatomy_of`). A folder given
    by ``data_dir`` or ``$HIPSEG_DATA`` is left as it is."""
    if data_dir or os.environ.get("HIPSEG_DATA"):
        return resolve_data_dir(data_dir)
    from .synth import ANATOMY, anatomy_of, make_dataset

    default = default_data_dir()
    found = anatomy_of(default)
    if found is not None and found != ANATOMY:
        aside = _free_name(default.with_name(f"{default.name}.anatomy-{found}"))
        log(f"{default} was made by an older generator (anatomy {found}, now {ANATOMY}): "
            f"moving it to {aside} and making it anew")
        default.rename(aside)
    if not default.exists():
        log(f"making the default synthetic data set in {default} ...")
        make_dataset(default)
    return resolve_data_dir()


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


def default_cache_dir() -> Path:
    """Where preprocessed volumes are cached: ``$HIPSEG_CACHE``, else ``$XDG_CACHE_HOME/hipseg``, else
    ``~/.cache/hipseg``."""
    if os.environ.get("HIPSEG_CACHE"):
        return Path(os.environ["HIPSEG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hipseg"
