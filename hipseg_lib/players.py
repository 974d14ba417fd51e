"""Slice browsers: a JavaScript slider that works in static HTML (no kernel, no network), and a
live ipywidgets viewer for a running kernel.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from . import BODY, BONES, CLASS_NAMES
from .viz import CLASS_COLOURS, class_legend, opening_slice, overlay_rgba, show_slice, slice_caption, slice_plane

__all__ = ["slider_frames", "static_slider", "live_slider", "SliceViewer", "slice_browser", "jshtml_player"]


def _interesting_range(labels: Sequence[np.ndarray | None], depth: int, pad: int = 2) -> tuple[int, int]:
    """Slices holding organs or bones (labels >= 2) in any label map, padded; all slices otherwise."""
    hits = [np.nonzero((lab >= BONES).any(axis=(0, 1)))[0] for lab in labels if lab is not None]
    hits = [h for h in hits if h.size]
    if not hits:
        return 0, depth
    return max(0, min(int(h[0]) for h in hits) - pad), min(depth, max(int(h[-1]) for h in hits) + 1 + pad)

_FONT_AWESOME_CDN = re.compile(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">\s*')

def jshtml_player(anim, mode: str) -> str:
    """matplotlib's JavaScript player of ``anim`` with nothing fetched from the network: its
    stylesheet link to Font Awesome on a CDN is dropped (the book's theme ships the icons)."""
    html, found = _FONT_AWESOME_CDN.subn("", anim.to_jshtml(default_mode=mode))
    if found != 1:
        raise RuntimeError("matplotlib's jshtml player changed: its Font Awesome link was not found")
    return html

def slider_frames(lo: int, hi: int, max_frames: int = 48) -> list[int]:
    """The slices a static slider embeds from ``[lo, hi)``: every one, or every second (third, ...)
    one when there are more than ``max_frames``; the last slice always.

    Example:
        >>> slider_frames(0, 10), slider_frames(0, 10, max_frames=5)
        ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 9])
    """
    step = max(1, -(-(hi - lo) // max_frames))
    return sorted(set(range(lo, hi, step)) | {hi - 1})


def static_slider(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                  spacing: Sequence[float] | None = None, max_frames: int = 48, panel_px: int = 440):
    """A JavaScript slider over axial slices that works in static HTML (no kernel, no network).

    One panel of ``panel_px`` pixels per entry of ``labels`` (``None`` shows the bare image), with the
    class colours' legend under them when labels are drawn. The slices that hold organs or bones
    (all slices without labels) are embedded, every one or every second one
    (:func:`slider_frames`), plus the prostate slice, where the player opens. Each frame is
    labelled with its index and its position in mm; frames are JPEG, to keep the page small.

    Returns:
        ``IPython.display.HTML``, with ``frames``, ``start`` and ``captions``: what each frame shows.
    """
    import matplotlib
    from IPython.display import HTML
    from matplotlib import animation

    lo, hi = _interesting_range(labels, image.shape[2])
    frames = slider_frames(lo, hi, max_frames)
    start = opening_slice(labels)
    start = frames[len(frames) // 2] if start is None else start
    frames = sorted(set(frames) | {start})
    captions = {k: slice_caption("axial", k, image.shape[2], spacing, 2) for k in frames}
    side = panel_px / 100
    legend = any(lab is not None for lab in labels)
    fig, axes = plt.subplots(1, len(labels), figsize=(side * len(labels), side + (0.8 if legend else 0.4)),
                             dpi=100, squeeze=False)
    alpha = 0.45  # the overlay's opacity, drawn again on every frame
    artists = [show_slice(ax, image, lab, index=start, spacing=spacing, title=t, alpha=alpha)
               for ax, lab, t in zip(axes[0], labels, titles)]
    caption = fig.suptitle("", fontsize=11)
    if legend:
        class_legend(fig)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.95))

    def update(k):
        for (im, lab_art), lab in zip(artists, labels):
            im.set_data(slice_plane(image, 2, k))
            if lab_art is not None and lab is not None:
                lab_art.set_data(overlay_rgba(slice_plane(lab, 2, k), alpha))
        caption.set_text(captions[k])
        return []

    anim = animation.FuncAnimation(fig, update, frames=frames, interval=200, blit=False)
    with matplotlib.rc_context({"animation.frame_format": "jpeg"}):
        html = jshtml_player(anim, "once")
    plt.close(fig)
    # matplotlib's player opens on its first frame: open it on the prostate slice instead.
    html, found = re.subn(r"(anim(\w+) = new Animation\([^;]*\);)",
                          lambda m: f"{m.group(1)}\n        anim{m.group(2)}.set_frame({frames.index(start)});", html)
    if found != 1:
        raise RuntimeError("matplotlib's jshtml player changed: cannot set its first frame")
    out = HTML(f'<div class="hipseg-slider">{html}</div>')
    for name, value in (("frames", frames), ("start", start), ("captions", captions)):
        setattr(out, name, value)  # what each frame shows, where it opens
    return out


_PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}

class SliceViewer:
    """A live slice browser for a running kernel (JupyterLab, Notebook): it scrolls as you drag.

    Frames are composed in numpy (grey image, organs as translucent fills, body as an outline)
    and sent as PNG to an ``ipywidgets.Image``; the figure is not redrawn, so a move costs one
    small PNG (cached). Controls: slice (``continuous_update=True``), plane, which label map
    (each one given, and their difference when there are two), overlay opacity.

    Args:
        image: (x, y, z) intensities.
        labels: label maps, ``None`` for "image only" (one option each).
        titles: the option names, one per entry of ``labels``.
        spacing: voxel size in mm (for the aspect ratio and the position in mm).
        size: the longer side of the displayed image in pixels.

    Example:
        >>> SliceViewer(img, (None, lab), ("MRI", "labels")).widget   # doctest: +SKIP
    """

    def __init__(self, image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,),
                 titles: Sequence[str] = ("",), spacing: Sequence[float] | None = None, size: int = 512):
        import ipywidgets as widgets

        self.image = np.asarray(image, dtype=np.float32)
        lo, hi = np.percentile(self.image, (0.5, 99.5))
        self.grey = (np.clip((self.image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        self.maps: dict[str, np.ndarray | None] = {t or "image": lab for t, lab in zip(titles, labels)}
        given = [lab for lab in labels if lab is not None]
        if len(given) == 2:
            self.maps["difference"] = (given[0] != given[1]).astype(np.uint8)
        self.spacing = tuple(spacing) if spacing is not None else (1.0, 1.0, 1.0)
        self.size = size
        self._cache: dict[tuple, bytes] = {}
        start_map = next((t for t in reversed(list(self.maps)) if self.maps[t] is not None and t != "difference"),
                         next(iter(self.maps)))
        self.plane = widgets.ToggleButtons(options=list(_PLANES), value="axial", description="plane")
        self.which = widgets.ToggleButtons(options=list(self.maps), value=start_map, description="labels")
        self.opacity = widgets.FloatSlider(value=0.45, min=0.0, max=1.0, step=0.05, description="opacity",
                                           continuous_update=True)
        self.slider = widgets.IntSlider(description="slice", continuous_update=True, min=0, max=1)
        self.caption = widgets.Label()
        self.frame = widgets.Image(format="png")
        for w, name in ((self.slider, "slice"), (self.frame, "frame"), (self.caption, "caption"),
                        (self.plane, "plane"), (self.which, "which"), (self.opacity, "opacity")):
            w.add_class(f"hipseg-{name}")
        self._set_plane("axial")
        self.slider.observe(lambda _: self._draw(), names="value")
        self.which.observe(lambda _: self._draw(), names="value")
        self.opacity.observe(lambda _: self._draw(), names="value")
        self.plane.observe(lambda ch: self._set_plane(ch["new"]), names="value")
        self.legend = widgets.HTML(legend_html())
        self.widget = widgets.VBox([widgets.HBox([self.plane]), widgets.HBox([self.which]),
                                    widgets.HBox([self.slider, self.caption]), self.opacity, self.frame,
                                    self.legend])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _start_index(self, axis: int) -> int:
        """The slice through the prostate (from any label map), else the middle."""
        start = opening_slice(self.maps.values(), axis)
        return self.image.shape[axis] // 2 if start is None else start

    def _set_plane(self, name: str) -> None:
        axis = _PLANES[name]
        with self.slider.hold_trait_notifications():
            self.slider.max = self.image.shape[axis] - 1
            self.slider.value = self._start_index(axis)
        self._draw()

    def render(self, plane: str, index: int, which: str, opacity: float) -> bytes:
        """The PNG of one frame (cached)."""
        key = (plane, index, which, round(opacity, 3))
        if key not in self._cache:
            self._cache[key] = _png(self._compose(plane, index, which, opacity))
            if len(self._cache) > 512:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def _display_size(self, plane: str) -> tuple[int, int]:
        rows, cols = self._grid(plane)
        return len(cols), len(rows)

    def _grid(self, plane: str) -> tuple[np.ndarray, np.ndarray]:
        """Source row and column of each displayed pixel: the physical aspect from the spacing,
        the longer side ``size`` pixels, nearest-neighbour."""
        axis = _PLANES[plane]
        h, w = slice_plane(self.grey, axis, 0).shape
        sp = {2: (self.spacing[1], self.spacing[0]), 1: (self.spacing[2], self.spacing[0]),
              0: (self.spacing[2], self.spacing[1])}[axis]
        scale = self.size / max(h * sp[0], w * sp[1])
        rows = np.minimum((np.arange(max(1, round(h * sp[0] * scale))) / (sp[0] * scale)).astype(int), h - 1)
        cols = np.minimum((np.arange(max(1, round(w * sp[1] * scale))) / (sp[1] * scale)).astype(int), w - 1)
        return rows, cols

    def _compose(self, plane: str, index: int, which: str, opacity: float) -> np.ndarray:
        axis = _PLANES[plane]
        grey = slice_plane(self.grey, axis, index)
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        lab = self.maps[which]
        if lab is not None:
            sl = slice_plane(lab, axis, index)
            if which == "difference":
                _blend(rgb, sl > 0, (255, 0, 255), opacity)
            else:  # the same overlay as the static figures, its outline a little stronger
                rgba = overlay_rgba(sl, opacity, min(1.0, 2 * opacity))
                a = rgba[..., 3:]
                rgb = (1 - a) * rgb + a * 255 * rgba[..., :3]
        rows, cols = self._grid(plane)
        return rgb.astype(np.uint8)[rows][:, cols]

    def _draw(self) -> None:
        plane, index = self.plane.value, int(self.slider.value)
        png = self.render(plane, index, self.which.value, float(self.opacity.value))
        w, h = self._display_size(plane)
        self.frame.width, self.frame.height = str(w), str(h)
        self.frame.value = png
        axis = _PLANES[plane]
        self.caption.value = slice_caption(plane, index, self.image.shape[axis], self.spacing, axis)

def _blend(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    if mask.any() and alpha > 0:
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float32)

def _png(rgb: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(rgb).save(buf, format="png", compress_level=1)
    return buf.getvalue()

def legend_html() -> str:
    """The class colours as an HTML line (the live viewer's legend; the body is drawn as an outline)."""
    from html import escape

    items = [f'<span style="border:2px solid {CLASS_COLOURS[BODY]};padding:0 6px">&nbsp;</span> '
             f"{CLASS_NAMES[BODY]} (outline)"]
    items += [f'<span style="background:{CLASS_COLOURS[c]};padding:0 9px">&nbsp;</span> {escape(CLASS_NAMES[c])}'
              for c in range(BONES, len(CLASS_NAMES))]
    return '<div class="hipseg-legend">' + " &nbsp; ".join(items) + "</div>"


def live_slider(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                spacing: Sequence[float] | None = None, size: int = 512):
    """The live slice browser (:class:`SliceViewer`) as a widget (needs a running kernel)."""
    return SliceViewer(image, labels, titles, spacing, size).widget

def slice_browser(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                  spacing: Sequence[float] | None = None, live: bool = True, max_frames: int = 48):
    """A slice browser: the ipywidgets slider when ``live``, else the static JavaScript slider.

    The book is built with ``live=False`` so that its HTML pages work without a kernel; a reader
    stepping through a notebook gets the widget.
    """
    if live:
        return live_slider(image, labels, titles, spacing)
    return static_slider(image, labels, titles, spacing, max_frames=max_frames)
