"""Figures for the book: label overlays, single slices, orthogonal views, the seed's three-panel
figure, tables, and the book's figure style.

Arrays are (x, y, z) in LPS voxel order; axial slices are drawn with anterior at the top and
the patient's left on the right of the image (radiological convention). Slice browsers are in
:mod:`~hipseg_lib.players`, the network's picture in :mod:`~hipseg_lib.network_view`, 3D surfaces
in :mod:`~hipseg_lib.surfaces`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from . import BODY, BONES, CLASS_NAMES, PROSTATE

__all__ = ["CLASS_COLOURS", "BOOK_STYLE", "use_book_style", "show_slice", "mark_directions",
           "orthogonal_views", "prostate_slice", "three_panel", "uncertainty_panel", "overlay_rgba", "class_legend",
           "per_class_text", "html_table", "zoom_to", "slice_plane", "opening_slice", "slice_caption"]

# The book's column is about 690 px wide at 1280 px, and a full-width cell about 1020 px: a figure
# of at most 7 inches (or 10, full width) at 100 dpi is shown at its own size, so text of 8 pt or
# more reads at 11 px or more.
BOOK_STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 10, "axes.titlesize": 11,
              "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9,
              "figure.titlesize": 12}


def use_book_style() -> None:
    """Matplotlib settings of the book's figures (:data:`BOOK_STYLE`)."""
    plt.rcParams.update(cast(Any, BOOK_STYLE))


CLASS_COLOURS = ["#00000000", "#4daf4a", "#ffff33", "#377eb8", "#ff7f00", "#e41a1c"]


def slice_plane(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    sl = np.take(volume, index, axis=axis)
    return sl.T if axis == 2 else sl.T[::-1]  # axial: rows=y (anterior up); others: superior up

def _aspect(spacing: Sequence[float] | None, axis: int) -> float:
    if spacing is None:
        return 1.0
    sx, sy, sz = spacing
    return {2: sy / sx, 1: sz / sx, 0: sz / sy}[axis]

def _outline(inside: np.ndarray) -> np.ndarray:
    """The border pixels of a 2D mask (4-neighbourhood)."""
    return inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1))

def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]

def overlay_rgba(label_plane: np.ndarray, alpha: float = 0.45, outline_alpha: float = 1.0) -> np.ndarray:
    """RGBA overlay of one label slice: organs and bones as translucent fills, the body as a thin
    outline (so the anatomy under it stays visible), everything else transparent."""
    rgba = np.zeros((*label_plane.shape, 4), np.float32)
    for c in range(BONES, len(CLASS_NAMES)):
        rgba[label_plane == c] = (*(v / 255 for v in _rgb(CLASS_COLOURS[c])), alpha)
    rgba[_outline(label_plane >= BODY)] = (*(v / 255 for v in _rgb(CLASS_COLOURS[BODY])), outline_alpha)
    return rgba

def opening_slice(labels, axis: int = 2) -> int | None:
    """The prostate slice of the first label map that holds prostate (None when none does): where
    slice browsers open."""
    given = [lab for lab in labels if lab is not None and (lab == PROSTATE).any()]
    return prostate_slice(given[0], axis) if given else None

def slice_caption(plane: str, index: int, n: int, spacing: Sequence[float] | None, axis: int) -> str:
    """"axial slice 12 of 64 (43.2 mm)": the index and the position along the axis."""
    where = f"{index * spacing[axis]:.1f} mm" if spacing is not None else f"{index} voxels"
    return f"{plane} slice {index} of {n} ({where})"

def show_slice(ax, image: np.ndarray, label: np.ndarray | None = None, axis: int = 2, index: int | None = None,
               spacing: Sequence[float] | None = None, title: str | None = None, alpha: float = 0.45):
    """Draw one slice of ``image`` with ``label`` overlaid (:func:`overlay_rgba`); returns the
    image artists (the overlay's is None without a label)."""
    index = image.shape[axis] // 2 if index is None else index
    im = ax.imshow(slice_plane(image, axis, index), cmap="gray", aspect=_aspect(spacing, axis), interpolation="nearest")
    lab = None
    if label is not None:
        lab = ax.imshow(overlay_rgba(slice_plane(label, axis, index), alpha), aspect=_aspect(spacing, axis),
                        interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=11)
    return im, lab

def class_legend(fig, loc: str = "lower center", ncol: int = 5, classes: Sequence[int] | None = None) -> None:
    """Colour legend of the foreground classes under a figure (or inside an axes, given one):
    body as an outline and every other class, or only the (solid) ``classes`` given."""
    from matplotlib.patches import Patch

    handles = []
    if classes is None:
        handles = [Patch(facecolor="none", edgecolor=CLASS_COLOURS[BODY], linewidth=1.5,
                         label=f"{CLASS_NAMES[BODY]} (outline)")]
        classes = range(BONES, len(CLASS_NAMES))
    handles += [Patch(color=CLASS_COLOURS[c], label=CLASS_NAMES[c]) for c in classes]
    fig.legend(handles=handles, loc=loc, ncol=ncol, frameon=False, fontsize=12 if ncol == 1 else 10)

# Which way each edge of a drawn plane points in the patient, for an LPS array (axis 0 to the
# left, 1 to the back, 2 to the head) drawn by slice_plane: (left, right, top, bottom) edges.
LPS_EDGES = {2: ("R", "L", "A", "P"), 1: ("R", "L", "S", "I"), 0: ("A", "P", "S", "I")}


def mark_directions(ax, axis: int) -> None:
    """Letter the edges of a plane drawn by :func:`show_slice` from an LPS array with the
    patient's directions (R/L, A/P, S/I): the patient's right is on the viewer's left, as
    radiologists read scans."""
    box = dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.6)
    left, right, top, bottom = LPS_EDGES[axis]
    for text, x, y in ((left, 0.02, 0.5), (right, 0.98, 0.5), (top, 0.5, 0.97), (bottom, 0.5, 0.03)):
        ax.text(x, y, text, transform=ax.transAxes, ha="center", va="center", color="white",
                fontsize=10, weight="bold", bbox=box)


def orthogonal_views(image: np.ndarray, label: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                     center: Sequence[int] | None = None, title: str = ""):
    """Axial, coronal and sagittal slices of an LPS array through ``center`` (default: the
    prostate or the middle), each edge lettered with the patient's direction
    (:func:`mark_directions`)."""
    if center is None:
        center = [s // 2 for s in image.shape]
        if label is not None and (label == PROSTATE).any():
            center = [int(np.median(ix)) for ix in np.nonzero(label == PROSTATE)]
    # The axial view large on the left, the two shorter views stacked on the right: the page's
    # full width goes to anatomy, not to white space.
    fig = plt.figure(figsize=(10, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.1, 1.0))
    axes = [fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])]
    for ax, axis, name in zip(axes, (2, 1, 0), ("axial", "coronal", "sagittal")):
        show_slice(ax, image, label, axis=axis, index=center[axis], spacing=spacing,
                   title=f"{name} (slice {center[axis]})")
        mark_directions(ax, axis)
    if label is not None:
        class_legend(fig)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig

def zoom_to(axes, mask: np.ndarray, margin: int = 10) -> None:
    """Zoom axial panels drawn by :func:`show_slice` onto the box around ``mask`` (one axial
    slice, x by y) plus ``margin`` voxels on each side."""
    xs, ys = np.nonzero(np.asarray(mask))
    if not xs.size:
        return
    for ax in axes:  # an axial panel's columns are x, its rows y
        ax.set_xlim(xs.min() - margin - 0.5, xs.max() + margin + 0.5)
        ax.set_ylim(ys.max() + margin + 0.5, ys.min() - margin - 0.5)


def prostate_slice(label: np.ndarray, axis: int = 2) -> int:
    """The slice along ``axis`` (default axial) with the most prostate voxels (the middle slice
    when there are none)."""
    if not (label == PROSTATE).any():
        return label.shape[axis] // 2
    return int(np.argmax((label == PROSTATE).sum(tuple(a for a in range(3) if a != axis))))

def three_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, index: int | None = None,
                spacing: Sequence[float] | None = None, title: str = "",
                titles: Sequence[str] = ("MRI", "ground truth", "prediction")):
    """The seed's figure: MRI slice, ground truth, prediction (axial). ``titles`` name the panels,
    so the same figure shows any two label maps side by side (e.g. before and after post-processing)."""
    if index is None:
        index = prostate_slice(truth)
    fig, axes = plt.subplots(1, 3, figsize=(10, 4))
    show_slice(axes[0], image, None, index=index, spacing=spacing, title=titles[0])
    show_slice(axes[1], image, truth, index=index, spacing=spacing, title=titles[1], alpha=0.6)
    show_slice(axes[2], image, pred, index=index, spacing=spacing, title=titles[2], alpha=0.6)
    class_legend(fig)
    fig.suptitle(f"{title} (axial slice {index})" if title else f"axial slice {index}")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))  # room for the title above the panels' own
    return fig

def uncertainty_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, uncertainty: np.ndarray,
                      index: int | None = None, spacing: Sequence[float] | None = None, title: str = ""):
    """Prediction, its errors (red: the prediction differs from the truth) and the voxel-wise
    entropy of the class probabilities on one axial slice: do the errors sit where it is unsure?"""
    if index is None:
        index = prostate_slice(truth)
    fig, axes = plt.subplots(1, 3, figsize=(10, 4))
    show_slice(axes[0], image, pred, index=index, spacing=spacing, title="prediction", alpha=0.6)
    wrong = np.ma.masked_equal((pred != truth).astype(np.uint8), 0)
    show_slice(axes[1], image, None, index=index, spacing=spacing, title="errors (cyan)")
    axes[1].imshow(slice_plane(wrong, 2, index), cmap=ListedColormap(["#00e5ff"]), aspect=_aspect(spacing, 2),
                   interpolation="nearest")
    plane = slice_plane(np.asarray(uncertainty, np.float32), 2, index)
    art = axes[2].imshow(plane, cmap="magma", vmin=0, vmax=max(0.05, float(plane.max())),
                         aspect=_aspect(spacing, 2), interpolation="nearest")
    axes[2].set_axis_off()
    axes[2].set_title("entropy (0: sure; 1: all classes equal)", fontsize=10)
    fig.colorbar(art, ax=axes[2], fraction=0.046, pad=0.02)
    fig.suptitle(f"{title} (axial slice {index})" if title else f"axial slice {index}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig

def per_class_text(values: Sequence[float], fmt: str = ".3f", names: Sequence[str] = CLASS_NAMES) -> str:
    """Per-class numbers as two aligned lines (names over values), short enough for the page.

    Example:
        >>> print(per_class_text([0.5, 0.25], names=("body", "prostate")))
         body prostate
        0.500    0.250
    """
    cells = [format(float(v), fmt) if v is not None else "n/a" for v in values]
    widths = [max(len(n), len(c)) for n, c in zip(names, cells)]
    return (" ".join(n.rjust(w) for n, w in zip(names, widths)) + "\n"
            + " ".join(c.rjust(w) for c, w in zip(cells, widths)))

def html_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3f", caption: str = ""):
    """A small HTML table from a list of dicts (no pandas needed). Floats get ``floatfmt``, except
    in a column whose name says millimetres (``"(mm)"``): a tenth of a millimetre is precision
    enough there."""
    from html import escape

    from IPython.display import HTML

    columns = list(columns or (rows[0].keys() if rows else []))

    def fmt(v, column):
        if isinstance(v, float):
            return "n/a" if v != v else format(v, ".1f" if "(mm)" in str(column) else floatfmt)
        if isinstance(v, (tuple, list)):
            return " x ".join(str(x) for x in v)
        return "" if v is None else str(v)

    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return HTML(f'<table class="hipseg-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
