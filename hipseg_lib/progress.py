"""Progress bars that suit where the code runs.

- In a live notebook: tqdm's notebook widget.
- With ``HIPSEG_PLAIN_PROGRESS=1`` (how ``hipseg book`` executes the chapters): plain text bars,
  updated at most every 20 s; a loop done before its first update (a warm cache) prints nothing,
  so the built HTML holds no widget that needs a kernel and no bar for work that was quick.
- On a terminal: text bars; when stderr is not a terminal (pipes, logs, tests) none at all,
  so that an error stays a single line.
"""
from __future__ import annotations

import os
import sys

__all__ = ["progress"]


def progress(iterable=None, **kwargs):
    """A tqdm progress bar suited to where the code runs."""
    if os.environ.get("HIPSEG_PLAIN_PROGRESS") == "1":
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", 20.0)
        kwargs.setdefault("delay", 5.0)  # a loop done before its first 20-s update prints nothing
        kwargs.setdefault("ascii", True)
        kwargs["leave"] = True
        return tqdm(iterable, **kwargs)
    if "ipykernel" in sys.modules:
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    from tqdm.std import tqdm

    kwargs.setdefault("disable", None)  # None: off when stderr is not a terminal
    return tqdm(iterable, **kwargs)
