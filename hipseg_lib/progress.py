"""Progress bars that suit where the code runs.

- In a live notebook: tqdm's notebook widget. (The executed book asks for none: its chapters pass
  ``progress=False``, so the built HTML holds no widget that needs a kernel.)
- On a terminal: text bars; when stderr is not a terminal (pipes, logs, tests) none at all,
  so that an error stays a single line.
"""
from __future__ import annotations

import sys

__all__ = ["progress"]


def progress(iterable=None, **kwargs):
    """A tqdm progress bar suited to where the code runs."""
    if "ipykernel" in sys.modules:
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    from tqdm.std import tqdm

    kwargs.setdefault("disable", None)  # None: off when stderr is not a terminal
    return tqdm(iterable, **kwargs)
