"""Figures for the book: label overlays, orthogonal views, the seed's three-panel figure and
slice browsers that work both live (ipywidgets) and in static HTML (a JavaScript slider).

Arrays are (x, y, z) in LPS voxel order; axial slices are drawn with anterior at the top and
the patient's left on the right of the image (radiological convention).
"""
from __future__ import annotations

import re
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from . import BLADDER, BODY, BONES, CLASS_NAMES, PROSTATE, RECTUM

__all__ = ["CLASS_COLOURS", "label_cmap", "show_slice", "orthogonal_views", "prostate_slice", "three_panel",
           "uncertainty_panel", "overlay_rgba", "class_legend", "per_class_text",
           "static_slider", "live_slider", "SliceViewer", "slice_browser", "html_table", "network_levels",
           "network_diagram", "head_predictions", "deep_supervision_panel", "class_surfaces", "surface_view"]

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


def _outline(inside: np.ndarray) -> np.ndarray:
    """The border pixels of a 2D mask (4-neighbourhood)."""
    return inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1))


def overlay_rgba(label_plane: np.ndarray, alpha: float = 0.45, outline_alpha: float = 1.0) -> np.ndarray:
    """RGBA overlay of one label slice: organs and bones as translucent fills, the body as a thin
    outline (so the anatomy under it stays visible), everything else transparent."""
    rgba = np.zeros((*label_plane.shape, 4), np.float32)
    for c in range(BONES, len(CLASS_NAMES)):
        rgba[label_plane == c] = (*(v / 255 for v in _rgb(CLASS_COLOURS[c])), alpha)
    rgba[_outline(label_plane >= BODY)] = (*(v / 255 for v in _rgb(CLASS_COLOURS[BODY])), outline_alpha)
    return rgba


def _opening_slice(labels, axis: int = 2) -> int | None:
    """The prostate slice of the first label map that holds prostate (None when none does): where
    slice browsers open."""
    given = [lab for lab in labels if lab is not None and (lab == PROSTATE).any()]
    return prostate_slice(given[0], axis) if given else None


def _slice_caption(plane: str, index: int, n: int, spacing: Sequence[float] | None, axis: int) -> str:
    """"axial slice 12 of 64 (43.2 mm)": the index and the position along the axis."""
    where = f"{index * spacing[axis]:.1f} mm" if spacing is not None else f"{index} voxels"
    return f"{plane} slice {index} of {n} ({where})"


def show_slice(ax, image: np.ndarray, label: np.ndarray | None = None, axis: int = 2, index: int | None = None,
               spacing: Sequence[float] | None = None, title: str | None = None, alpha: float = 0.45):
    """Draw one slice of ``image`` with ``label`` overlaid (:func:`overlay_rgba`); returns the
    image artists (the overlay's is None without a label)."""
    index = image.shape[axis] // 2 if index is None else index
    im = ax.imshow(_plane(image, axis, index), cmap="gray", aspect=_aspect(spacing, axis), interpolation="nearest")
    lab = None
    if label is not None:
        lab = ax.imshow(overlay_rgba(_plane(label, axis, index), alpha), aspect=_aspect(spacing, axis),
                        interpolation="nearest")
        lab.hipseg_alpha = alpha
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return im, lab


def class_legend(fig, loc: str = "lower center", ncol: int = 5, classes: Sequence[int] | None = None) -> None:
    """Colour legend of the foreground classes under a figure: body as an outline and every other
    class, or only the (solid) ``classes`` given."""
    from matplotlib.patches import Patch

    handles = []
    if classes is None:
        handles = [Patch(facecolor="none", edgecolor=CLASS_COLOURS[BODY], linewidth=1.5,
                         label=f"{CLASS_NAMES[BODY]} (outline)")]
        classes = range(BONES, len(CLASS_NAMES))
    handles += [Patch(color=CLASS_COLOURS[c], label=CLASS_NAMES[c]) for c in classes]
    fig.legend(handles=handles, loc=loc, ncol=ncol, frameon=False, fontsize=9)


def orthogonal_views(image: np.ndarray, label: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                     center: Sequence[int] | None = None, title: str = ""):
    """Axial, coronal and sagittal slices through ``center`` (default: the prostate or the middle)."""
    if center is None:
        center = [s // 2 for s in image.shape]
        if label is not None and (label == PROSTATE).any():
            center = [int(np.median(ix)) for ix in np.nonzero(label == PROSTATE)]
    # The axial view large on the left, the two shorter views stacked on the right: the page's
    # full width goes to anatomy, not to white space.
    fig = plt.figure(figsize=(11, 6.6))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.1, 1.0))
    axes = [fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])]
    for ax, axis, name in zip(axes, (2, 1, 0), ("axial", "coronal", "sagittal")):
        show_slice(ax, image, label, axis=axis, index=center[axis], spacing=spacing,
                   title=f"{name} (slice {center[axis]})")
    if label is not None:
        class_legend(fig)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


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
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    show_slice(axes[0], image, None, index=index, spacing=spacing, title=titles[0])
    show_slice(axes[1], image, truth, index=index, spacing=spacing, title=titles[1], alpha=0.6)
    show_slice(axes[2], image, pred, index=index, spacing=spacing, title=titles[2], alpha=0.6)
    class_legend(fig)
    fig.suptitle(f"{title} axial slice {index}".strip())
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))  # room for the title above the panels' own
    return fig


def uncertainty_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, uncertainty: np.ndarray,
                      index: int | None = None, spacing: Sequence[float] | None = None, title: str = ""):
    """Prediction, its errors (red: the prediction differs from the truth) and the voxel-wise
    entropy of the class probabilities on one axial slice: do the errors sit where it is unsure?"""
    if index is None:
        index = prostate_slice(truth)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    show_slice(axes[0], image, pred, index=index, spacing=spacing, title="prediction", alpha=0.6)
    wrong = np.ma.masked_equal((pred != truth).astype(np.uint8), 0)
    show_slice(axes[1], image, None, index=index, spacing=spacing, title="errors (red)")
    axes[1].imshow(_plane(wrong, 2, index), cmap=ListedColormap(["red"]), aspect=_aspect(spacing, 2),
                   interpolation="nearest")
    plane = _plane(np.asarray(uncertainty, np.float32), 2, index)
    art = axes[2].imshow(plane, cmap="magma", vmin=0, vmax=max(0.05, float(plane.max())),
                         aspect=_aspect(spacing, 2), interpolation="nearest")
    axes[2].set_axis_off()
    axes[2].set_title("entropy (0: sure; 1: all classes equal)", fontsize=10)
    fig.colorbar(art, ax=axes[2], fraction=0.046, pad=0.02)
    fig.suptitle(f"{title} axial slice {index}".strip())
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _frames(n: int, max_frames: int) -> list[int]:
    if n <= max_frames:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_frames).round().astype(int).tolist()))


def _interesting_range(labels: Sequence[np.ndarray | None], depth: int, pad: int = 2) -> tuple[int, int]:
    """Slices holding organs or bones (labels >= 2) in any label map, padded; all slices otherwise."""
    hits = [np.nonzero((lab >= BONES).any(axis=(0, 1)))[0] for lab in labels if lab is not None]
    hits = [h for h in hits if h.size]
    if not hits:
        return 0, depth
    return max(0, min(int(h[0]) for h in hits) - pad), min(depth, max(int(h[-1]) for h in hits) + 1 + pad)


_FONT_AWESOME_CDN = re.compile(r'<link rel="stylesheet"\s+href="https://[^"]*font-awesome[^"]*">\s*')


def _player(anim, mode: str) -> str:
    """matplotlib's JavaScript player of ``anim`` with nothing fetched from the network: its
    stylesheet link to Font Awesome on a CDN is dropped (the book's theme ships the icons)."""
    html, found = _FONT_AWESOME_CDN.subn("", anim.to_jshtml(default_mode=mode))
    if found != 1:
        raise RuntimeError("matplotlib's jshtml player changed: its Font Awesome link was not found")
    return html


def static_slider(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                  spacing: Sequence[float] | None = None, max_frames: int = 24, size: float = 3.2, dpi: int = 72):
    """A JavaScript slider over axial slices that works in static HTML (no kernel, no network).

    One panel per entry of ``labels`` (``None`` shows the bare image). At most
    ``max_frames`` evenly spaced slices are embedded to keep the page small, taken from the
    slices that hold organs or bones when labels are given, plus the prostate slice, where the
    player opens. Each frame is labelled with its index and its position in mm.

    Returns:
        ``IPython.display.HTML``.
    """
    from IPython.display import HTML
    from matplotlib import animation

    lo, hi = _interesting_range(labels, image.shape[2])
    frames = [lo + k for k in _frames(hi - lo, max_frames)]
    start = _opening_slice(labels)
    start = frames[len(frames) // 2] if start is None else start
    frames = sorted(set(frames) | {start})
    captions = {k: _slice_caption("axial", k, image.shape[2], spacing, 2) for k in frames}
    fig, axes = plt.subplots(1, len(labels), figsize=(size * len(labels), size), dpi=dpi, squeeze=False)
    artists = [show_slice(ax, image, lab, index=start, spacing=spacing, title=t)
               for ax, lab, t in zip(axes[0], labels, titles)]
    caption = fig.suptitle("", fontsize=10)
    fig.tight_layout()

    def update(k):
        for (im, lab_art), lab in zip(artists, labels):
            im.set_data(_plane(image, 2, k))
            if lab_art is not None:
                lab_art.set_data(overlay_rgba(_plane(lab, 2, k), lab_art.hipseg_alpha))
        caption.set_text(captions[k])
        return []

    anim = animation.FuncAnimation(fig, update, frames=frames, interval=200, blit=False)
    html = _player(anim, "once")
    plt.close(fig)
    # matplotlib's player opens on its first frame: open it on the prostate slice instead.
    html, found = re.subn(r"(anim(\w+) = new Animation\([^;]*\);)",
                          lambda m: f"{m.group(1)}\n        anim{m.group(2)}.set_frame({frames.index(start)});", html)
    if found != 1:
        raise RuntimeError("matplotlib's jshtml player changed: cannot set its first frame")
    out = HTML(html)
    out.frames, out.start, out.captions = frames, start, captions  # what each frame shows, where it opens
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
                 titles: Sequence[str] = ("",), spacing: Sequence[float] | None = None, size: int = 384):
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
        self.widget = widgets.VBox([widgets.HBox([self.plane]), widgets.HBox([self.which]),
                                    widgets.HBox([self.slider, self.caption]), self.opacity, self.frame])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _start_index(self, axis: int) -> int:
        """The slice through the prostate (from any label map), else the middle."""
        start = _opening_slice(self.maps.values(), axis)
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
        h, w = _plane(self.grey, axis, 0).shape
        sp = {2: (self.spacing[1], self.spacing[0]), 1: (self.spacing[2], self.spacing[0]),
              0: (self.spacing[2], self.spacing[1])}[axis]
        scale = self.size / max(h * sp[0], w * sp[1])
        rows = np.minimum((np.arange(max(1, round(h * sp[0] * scale))) / (sp[0] * scale)).astype(int), h - 1)
        cols = np.minimum((np.arange(max(1, round(w * sp[1] * scale))) / (sp[1] * scale)).astype(int), w - 1)
        return rows, cols

    def _compose(self, plane: str, index: int, which: str, opacity: float) -> np.ndarray:
        axis = _PLANES[plane]
        grey = _plane(self.grey, axis, index)
        rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        lab = self.maps[which]
        if lab is not None:
            sl = _plane(lab, axis, index)
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
        self.caption.value = _slice_caption(plane, index, self.image.shape[axis], self.spacing, axis)


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _blend(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> None:
    if mask.any() and alpha > 0:
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float32)


def _png(rgb: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(rgb).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def live_slider(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                spacing: Sequence[float] | None = None, size: int = 384):
    """The live slice browser (:class:`SliceViewer`) as a widget (needs a running kernel)."""
    return SliceViewer(image, labels, titles, spacing, size).widget


def slice_browser(image: np.ndarray, labels: Sequence[np.ndarray | None] = (None,), titles: Sequence[str] = ("",),
                  spacing: Sequence[float] | None = None, live: bool = True, max_frames: int = 24):
    """A slice browser: the ipywidgets slider when ``live``, else the static JavaScript slider.

    The book is built with ``live=False`` so that its HTML pages work without a kernel; a reader
    stepping through a notebook gets the widget.
    """
    if live:
        return live_slider(image, labels, titles, spacing)
    return static_slider(image, labels, titles, spacing, max_frames=max_frames)


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


def _block_name(block, side: str) -> str:
    kind = type(block).__name__
    if kind == "Identity":  # encoder: the stem is the level's only convolution; decoder: none
        return "stem only" if side == "encoder" else "no conv: head reads concat"
    if kind == "ResidualBlock":
        return "residual block"
    if kind == "ConvBlock":
        k = block.conv.kernel_size[0]
        return f"one {k}x{k}x{k} conv"
    return kind


def network_levels(model) -> list[dict]:
    """What :func:`network_diagram` draws, read from the built network (so the picture cannot
    drift from the code): per level, its channels, the encoder and decoder blocks, how it is
    reached from the level above, and whether a deep-supervision head reads it.

    Example:
        >>> from hipseg_lib.model import ModelConfig, ResUNet3D
        >>> [r["channels"] for r in network_levels(ResUNet3D(ModelConfig(base_channels=4, depth=3)))]
        [4, 8, 16]
    """
    c = model.config
    depth = c.depth
    widths = [c.base_channels * 2 ** i for i in range(depth)]
    aux = len(model.aux_heads) if model.aux_heads is not None else 0
    rows = []
    for i in range(depth):
        down = None if i == 0 else ("stride-2 conv" if type(model.down[i - 1]).__name__ == "DownConv"
                                    else "2x2x2 max pool")
        if i == depth - 1:
            enc, dec = "2 residual blocks (bottleneck)", None
        else:
            enc = _block_name(model.encoder[i], "encoder")
            enc = ("stem conv + " + enc) if i == 0 and enc != "stem only" else enc
            dec = _block_name(model.decoder[depth - 2 - i].block, "decoder")
        rows.append({"level": i, "channels": widths[i], "down": down, "encoder": enc, "decoder": dec,
                     "deep_supervision": 1 <= i <= aux})
    return rows


def network_diagram(model, title: str = ""):
    """The U of ``model`` (a :class:`~hipseg_lib.model.ResUNet3D`): one box per level and side
    with its channels and block, the downsampling between levels, the skip connections, the
    deep-supervision heads and the 1x1x1 head. Returns the figure."""
    from matplotlib.patches import FancyBboxPatch

    rows = network_levels(model)
    depth = len(rows)
    fig, ax = plt.subplots(figsize=(11, 1.0 * depth + 0.9))
    ax.set_xlim(0, 11)
    ax.set_ylim(-depth + 0.45, 1.0)
    ax.axis("off")

    def box(x, y, w, text, colour):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - 0.32), w, 0.64, boxstyle="round,pad=0.02",
                                    fc=colour, ec="#444444", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=9)

    def arrow(x0, y0, x1, y1, text="", style="-|>", ls="-"):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle=style, lw=1, ls=ls, color="#444444"))
        if text:
            ax.text((x0 + x1) / 2 + 0.1, (y0 + y1) / 2, text, fontsize=8, va="center", color="#333333")

    enc_x, dec_x = 2.3, 7.3
    for r in rows:
        y = -r["level"]
        last = r["level"] == depth - 1
        x = (enc_x + dec_x) / 2 if last else enc_x
        box(x, y, 3.3, f"level {r['level']}: {r['channels']} ch\n{r['encoder']}", "#dbe9f6")
        if r["down"]:
            above = -(r["level"] - 1)
            arrow(enc_x, above - 0.34, x - (0.9 if last else 0), y + 0.34, r["down"])
        if not last:
            box(dec_x, y, 3.3, f"level {r['level']}: {r['channels']} ch\n{r['decoder']}", "#fde2c8")
            arrow(enc_x + 1.68, y, dec_x - 1.68, y, ls="--")
            ax.text((enc_x + dec_x) / 2, y + 0.1, "skip: concatenate", fontsize=8, ha="center", color="#333333")
            below = -(r["level"] + 1)
            from_x = (enc_x + dec_x) / 2 + 0.9 if r["level"] + 1 == depth - 1 else dec_x
            arrow(from_x, below + 0.34, dec_x, y - 0.34, "transposed conv")
            if r["deep_supervision"]:
                box(10.0, y, 1.7, "1x1x1 head\n(deep supervision)", "#e5f5e0")
                arrow(dec_x + 1.68, y, 10.0 - 0.87, y)
    box(10.0, 0.0, 1.7, f"1x1x1 head\n{model.config.num_classes} classes", "#e5f5e0")
    arrow(dec_x + 1.68, 0.0, 10.0 - 0.87, 0.0)
    ax.text(enc_x, 0.75, "encoder", ha="center", fontsize=10, weight="bold")
    ax.text(dec_x, 0.75, "decoder", ha="center", fontsize=10, weight="bold")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def head_predictions(model, x) -> list[tuple[str, np.ndarray]]:
    """What each output head of ``model`` predicts for ``x`` (N=1): ``[(name, labels)]``, the coarse
    deep-supervision heads first (their own arg-max at their own grid, repeated to the input's
    grid for display), then the network's output (the final head plus the upsampled coarse ones).

    Example:
        >>> import torch
        >>> from hipseg_lib.model import ModelConfig, ResUNet3D
        >>> net = ResUNet3D(ModelConfig(base_channels=4, depth=4, deep_supervision=True)).eval()
        >>> [name for name, _ in head_predictions(net, torch.zeros(1, 1, 16, 16, 8))]
        ['level 2 head (1/4 grid)', 'level 1 head (1/2 grid)', 'output']
    """
    import torch

    heads = list(model.aux_heads or [])
    seen: list = [None] * len(heads)
    hooks = [h.register_forward_hook(lambda m, i, o, j=j: seen.__setitem__(j, o.detach()))
             for j, h in enumerate(heads)]
    try:
        with torch.no_grad():
            out = model(x).float()
    finally:
        for h in hooks:
            h.remove()
    size = x.shape[2:]
    rows = []
    for j, logits in enumerate(seen):
        level = len(heads) - j  # aux_heads run from the coarsest decoder level up
        factor = size[0] // logits.shape[2]
        lab = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        full = lab.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
        rows.append((f"level {level} head (1/{factor} grid)", full))
    rows.append(("output", out.argmax(1)[0].cpu().numpy().astype(np.uint8)))
    return rows


def deep_supervision_panel(model, image, truth, index: int | None = None):
    """One axial slice: the truth, then what each deep-supervision head and the output predict
    (:func:`head_predictions`). ``image`` and ``truth`` are a preprocessed volume and its labels
    on the network's grid. Returns the figure."""
    import torch

    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
    x = x.to(next(model.parameters()).device)
    rows = [("truth", np.asarray(truth))] + head_predictions(model, x)
    index = prostate_slice(np.asarray(truth)) if index is None else index
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 3.0))
    for ax, (name, lab) in zip(np.atleast_1d(axes), rows):
        show_slice(ax, image, lab, axis=2, index=index, title=name)
    class_legend(fig)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


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
            mesh.hipseg_class = c
            ax.add_collection3d(mesh)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(hi - lo, zoom=1.25)
        ax.view_init(elev=15, azim=-100)
        ax.set_axis_off()
        ax.set_title(name, fontsize=10)
        axes.append(ax)
    class_legend(fig, classes=SURFACE_CLASSES, ncol=len(SURFACE_CLASSES))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig, axes


def surface_view(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float], title: str = ""):
    """Truth and prediction of one scan in 3D, side by side: the surfaces of bones (faint),
    bladder, rectum and prostate (:func:`class_surfaces`), in mm, seen from the front and above.
    Returns the figure."""
    return _surface_figure(truth, pred, spacing, title, figsize=(11, 5))[0]


def surface_turntable(truth: np.ndarray, pred: np.ndarray, spacing: Sequence[float], title: str = "",
                      frames: int = 24, size: tuple[float, float] = (9, 4.2), dpi: int = 80):
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
        html = _player(anim, "loop")
    plt.close(fig)
    out = HTML(f'<div class="hipseg-turntable">{html}</div>')
    out.azimuths = azimuths
    return out
