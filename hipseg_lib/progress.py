"""Progress bars: notebook widgets when live, plain text when ``HIPSEG_PLAIN_PROGRESS=1``.

The book is executed with plain bars, so that the built HTML holds no widget that would need
a kernel or JavaScript from the network; text bars then update at most every 20 s.
"""
from __future__ import annotations

import os

__all__ = ["progress"]


def progress(iterable=None, **kwargs):
    """A tqdm progress bar suited to where the code runs."""
    if os.environ.get("HIPSEG_PLAIN_PROGRESS") == "1":
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", 20.0)
        kwargs.setdefault("ascii", True)
        kwargs["leave"] = True
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
