"""Figures for the book: label overlays, orthogonal views, the seed's three-panel figure and
slice browsers that work both live (ipywidgets) and in static HTML (a JavaScript slider).

Arrays are (x, y, z) in LPS voxel order; axial slices are drawn with anterior at the top and
the patient's left on the right of the image (radiological convention).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from . import CLASS_NAMES

__all__ = ["CLASS_COLOURS", "label_cmap", "show_slice", "orthogonal_views", "prostate_slice", "three_panel",
           "class_legend",
           "static_slider", "live_slider", "slice_browser", "html_table"]

CLASS_COLOURS = ["#00000000", "#4daf4a", "#ffff33", "#377eb8", "#ff7f00", "#e41a1c"]


def label_cmap() -> ListedColormap:
    """Colours of the six classes (background transparent)."""
    return ListedColormap(CLASS_COLOURS, name="hipseg")


def _plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    sl = np.take(volume, index, axis=axis)
    return sl.T if axis == 2 else sl.T[::-1]  # axial: rows=y (anterior up); others: superior up


def _aspect(spacing: Sequence[float] | None, axis: int) -> float:
    if spacing is None:
        return 1.0
    sx, sy, sz = spacing
    return {2: sy / sx, 1: sz / sx, 0: sz / sy}[axis]


def show_slice(ax, image: np.ndarray, label: np.ndarray | None = None, axis: int = 2, index: int | None = None,
               spacing: Sequence[float] | None = None, title: str | None = None, alpha: float = 0.45):
    """Draw one slice of ``image`` with ``label`` overlaid; returns the image artists."""
    index = image.shape[axis] // 2 if index is None else index
    im = ax.imshow(_plane(image, axis, index), cmap="gray", aspect=_aspect(spacing, axis), interpolation="nearest")
    lab = None
    if label is not None:
        lab = ax.imshow(_plane(label, axis, index), cmap=label_cmap(), vmin=-0.5, vmax=len(CLASS_NAMES) - 0.5,
                        alpha=alpha, aspect=_aspect(spacing, axis), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return im, lab


def class_legend(fig, loc: str = "lower center", ncol: int = 5) -> None:
    """Colour legend of the foreground classes under a figure."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=n) for c, n in zip(CLASS_COLOURS[1:], CLASS_NAMES[1:])]
    fig.legend(handles=handles, loc=loc, ncol=ncol, frameon=False, fontsize=9)


def orthogonal_views(image: np.ndarray, label: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                     center: Sequence[int] | None = None, title: str = ""):
    """Axial, coronal and sagittal slices through ``center`` (default: the prostate or the middle)."""
    if center is None:
        center = [s // 2 for s in image.shape]
        if label is not None and (label == 5).any():
            center = [int(np.median(ix)) for ix in np.nonzero(label == 5)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, axis, name in zip(axes, (2, 1, 0), ("axial", "coronal", "sagittal")):
        show_slice(ax, image, label, axis=axis, index=center[axis], spacing=spacing,
                   title=f"{name} (slice {center[axis]})")
    if label is not None:
        class_legend(fig)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def prostate_slice(label: np.ndarray) -> int:
    """The axial slice with the most prostate voxels (the middle slice when there are none)."""
    if not (label == 5).any():
        return label.shape[2] // 2
    return int(np.argmax((label == 5).sum((0, 1))))


def three_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, index: int | None = None,
                spacing: Sequence[float] | None = None, title: str = ""):
    """The seed's figure: MRI slice, ground truth, prediction (axial)."""
    if index is None:
        index = prostate_slice(truth)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    show_slice(axes[0], image, None, index=index, spacing=spacing, title="MRI")
    show_slice(axes[1], image, truth, index=index, spacing=spacing, title="ground truth", alpha=0.6)
    show_slice(axes[2], image, pred, index=index, spacing=spacing, title="prediction", alpha=0.6)
    class_legend(fig)
    fig.suptitle(f"{title} axial slice {index}".strip())
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _frames(n: int, max_frames: int) -> list[int]:
    if n <= max_frames:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_frames).round().astype(int).tolist()))


def _interesting_range(labels: Sequence[np.ndarray | None], depth: int, pad: int = 2) -> tuple[int, int]:
    """Slices holding organs or bones (labels >= 2) in any label map, padded; all slices otherwise."""
    hits = [np.nonzero((lab >= 2).any(axis=(0, 1)))[0] for lab in labels if lab is not None]
    hits = [h for h in hits if h.size]
    if not hits:
        return 0, depth
    return max(0, min(int(h[0]) for h in hits) - pad), min(depth, max(int(h[-1]) for h in hits) + 1 + pad)


def static_slider(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                  spacing: Sequence[float] | None = None, max_frames: int = 24, size: float = 3.2, dpi: int = 72):
    """A JavaScript slider over axial slices that works in static HTML (no kernel, no network).

    One panel per entry of ``labels`` (``None`` shows the bare image). At most
    ``max_frames`` evenly spaced slices are embedded to keep the page small, taken from the
    slices that hold organs or bones when labels are given.

    Returns:
        ``IPython.display.HTML``.
    """
    from IPython.display import HTML
    from matplotlib import animation

    lo, hi = _interesting_range(labels, image.shape[2])
    frames = [lo + k for k in _frames(hi - lo, max_frames)]
    fig, axes = plt.subplots(1, len(labels), figsize=(size * len(labels), size), dpi=dpi, squeeze=False)
    artists = [show_slice(ax, image, lab, index=frames[0], spacing=spacing, title=t)
               for ax, lab, t in zip(axes[0], labels, titles)]
    caption = fig.suptitle(f"axial slice {frames[0]}", fontsize=10)
    fig.tight_layout()

    def update(k):
        for (im, lab_art), lab in zip(artists, labels):
            im.set_data(_plane(image, 2, k))
            if lab_art is not None:
                lab_art.set_data(_plane(lab, 2, k))
        caption.set_text(f"axial slice {k} of {image.shape[2]}")
        return []

    anim = animation.FuncAnimation(fig, update, frames=frames, interval=200, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return HTML(html)


def live_slider(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                spacing: Sequence[float] | None = None, size: float = 3.5):
    """An ipywidgets slider over axial slices (needs a running kernel)."""
    import ipywidgets as widgets

    def draw(index: int):
        fig, axes = plt.subplots(1, len(labels), figsize=(size * len(labels), size), squeeze=False)
        for ax, lab, t in zip(axes[0], labels, titles):
            show_slice(ax, image, lab, index=index, spacing=spacing, title=t)
        fig.suptitle(f"axial slice {index} of {image.shape[2]}", fontsize=10)
        plt.show()

    slider = widgets.IntSlider(value=image.shape[2] // 2, min=0, max=image.shape[2] - 1, description="slice",
                               continuous_update=False)
    return widgets.interactive(draw, index=slider)


def slice_browser(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                  spacing: Sequence[float] | None = None, live: bool = True, max_frames: int = 24):
    """A slice browser: the ipywidgets slider when ``live``, else the static JavaScript slider.

    The book is built with ``live=False`` so that its HTML pages work without a kernel; a reader
    stepping through a notebook gets the widget.
    """
    if live:
        return live_slider(image, labels, titles, spacing)
    return static_slider(image, labels, titles, spacing, max_frames=max_frames)


def html_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f", caption: str = ""):
    """A small HTML table from a list of dicts (no pandas needed)."""
    from html import escape

    from IPython.display import HTML

    columns = list(columns or (rows[0].keys() if rows else []))

    def fmt(v):
        if isinstance(v, float):
            return "n/a" if v != v else format(v, floatfmt)
        if isinstance(v, (tuple, list)):
            return " x ".join(str(x) for x in v)
        return "" if v is None else str(v)

    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return HTML(f'<table class="hipseg-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
