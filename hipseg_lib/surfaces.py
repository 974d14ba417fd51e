"""Truth and prediction in 3D: marching-cubes surfaces of each class in millimetres, still or
turning (a JavaScript player that needs no kernel).
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from . import BLADDER, BONES, CLASS_NAMES, PROSTATE, RECTUM
from .players import jshtml_player
from .viz import CLASS_COLOURS, class_legend

__all__ = ["SURFACE_CLASSES", "class_surfaces", "surface_view", "surface_turntable"]


SURFACE_CLASSES = (BONES, BLADDER, RECTUM, PROSTATE)  # what the 3D views draw

def class_surfaces(label: np.ndarray, spacing: Sequence[float], classes: Sequence[int] = SURFACE_CLASSES,
                   step: int = 2) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The surface of each class present in ``label``: ``{class: (vertices in mm, triangles)}``, by
    marching cubes (scikit-image) on the class mask, every ``step``-th voxel. Voxel ``i`` is
    centred at ``i * spacing``; the surface runs half a voxel outside the class's outer voxels.

    Example:
        >>> lab = np.zeros((12, 12, 12), np.uint8); lab[2:10, 2:10, 2:10] = 5
        >>> v, f = class_surfaces(lab, (1.0, 1.0, 2.0), classes=(5,), step=1)[5]
        >>> [round(float(x), 1) for x in v.min(0)], [round(float(x), 1) for x in v.max(0)]
        ([1.5, 1.5, 3.0], [9.5, 9.5, 19.0])
    """
    from skimage.measure import marching_cubes

    out = {}
    for c in classes:
        mask = np.asarray(label) == c
        if mask.sum() < 8:
            continue
        padded = np.pad(mask, 1).astype(np.float32)  # closed surfaces at the volume's border
        for stride in dict.fromkeys((step, 1)):  # a part one voxel thin can fall between strides
            try:
                verts, faces, _, _ = marching_cubes(padded, 0.5, spacing=tuple(float(s) for s in spacing),
                                                    step_size=stride)
            except RuntimeError:  # "no surface found" at this stride
                continue
            out[c] = (verts - np.asarray(spacing, float), faces)
            break
    return out

def _surface_figure(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float], title: str,
                    figsize: tuple[float, float], dpi: float | None = None):
    """The figure of :func:`surface_view`; returns it and its two 3D axes."""
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    surfaces = [class_surfaces(label, spacing) for label in (truth, pred)]
    points = np.concatenate([v for s in surfaces for v, _ in s.values()] or [np.zeros((1, 3))])
    lo, hi = points.min(0) - 5, points.max(0) + 5  # the organs' box, 5 mm around
    fig = plt.figure(figsize=figsize, dpi=dpi)
    axes = []
    for k, (name, found) in enumerate(zip(("truth", "prediction"), surfaces)):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        for c, (verts, faces) in found.items():
            mesh = Poly3DCollection(verts[faces], alpha=0.2 if c == BONES else 0.9, linewidths=0,
                                    facecolors=CLASS_COLOURS[c], shade=True)
            mesh.set_label(CLASS_NAMES[c])
            ax.add_collection3d(mesh)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(hi - lo, zoom=1.25)
        ax.view_init(elev=15, azim=-100)
        ax.set_axis_off()
        ax.set_title(name, fontsize=11)
        axes.append(ax)
    class_legend(fig, classes=SURFACE_CLASSES, ncol=len(SURFACE_CLASSES))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig, axes

def surface_view(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float], title: str = ""):
    """Truth and prediction of one scan in 3D, side by side: the surfaces of bones (faint),
    bladder, rectum and prostate (:func:`class_surfaces`), in mm, seen from the front and above.
    Returns the figure."""
    return _surface_figure(truth, pred, spacing, title, figsize=(10, 4.8))[0]

def surface_turntable(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float], title: str = "",
                      frames: int = 24, size: tuple[float, float] = (10, 4.8), dpi: int = 100):
    """:func:`surface_view`, turning: a slider with play buttons rotates truth and prediction
    together about the head-foot axis, ``360 / frames`` degrees a frame, from
    :func:`surface_view`'s front view. It works in static HTML with no kernel and no network
    (matplotlib's JavaScript player; frames as JPEG, about 20 KB each at the default size).

    Returns:
        ``IPython.display.HTML`` (inside ``div.hipseg-turntable``) with ``azimuths``, the
        viewing angle of each frame in degrees.
    """
    from IPython.display import HTML
    from matplotlib import animation

    fig, axes = _surface_figure(truth, pred, spacing, title, figsize=size, dpi=dpi)
    azimuths = [-100 + k * 360 / frames for k in range(frames)]

    def turn(azim):
        for ax in axes:
            ax.view_init(elev=15, azim=azim)
        return []

    anim = animation.FuncAnimation(fig, turn, frames=azimuths, interval=150, blit=False)
    with matplotlib.rc_context({"animation.frame_format": "jpeg"}):
        html = jshtml_player(anim, "loop")
    plt.close(fig)
    out = HTML(f'<div class="hipseg-turntable">{html}</div>')
    setattr(out, "azimuths", azimuths)  # noqa: B010  (an attribute IPython's HTML does not declare)
    return out
