"""The network as a picture, drawn from the network object itself (so it cannot drift from the
code), and what each of its heads predicts.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .viz import class_legend, prostate_slice, show_slice

__all__ = ["network_levels", "network_diagram", "head_predictions", "heads_panel"]


def network_levels(model) -> list[dict]:
    """What :func:`network_diagram` draws, read from the built network: per level its channels,
    how it is reached from the level above, the encoder's and decoder's blocks, and whether a
    head reads it (and that head's loss weight, with deep supervision).

    Example:
        >>> from hipseg_lib.model import ModelConfig, ResUNet3D
        >>> [r["channels"] for r in network_levels(ResUNet3D(ModelConfig(base_channels=4, depth=3)))]
        [4, 8, 16]
    """
    c = model.config
    widths = [c.base_channels * 2 ** i for i in range(c.depth)]
    n_heads = len(model.heads)
    raw = [0.5 ** i for i in range(n_heads)]
    rows = []
    for i in range(c.depth):
        down = None
        if i > 0:
            down = "2x2x2 max pool" if c.downsample == "maxpool" else "stride-2 conv"
        last = i == c.depth - 1
        rows.append({"level": i, "channels": widths[i], "down": down,
                     "encoder": "residual block" + (" (bottleneck)" if last else ""),
                     "decoder": None if last else "up, concat, conv",
                     "head_weight": raw[i] / sum(raw) if i < n_heads else None})
    return rows


def network_diagram(model, title: str = "", input_shape: tuple[int, int, int] | None = None):
    """The U of ``model`` (a :class:`~hipseg_lib.model.ResUNet3D`): one box per level and side with
    its channels, grid (for ``input_shape``) and block; the downsampling, the skips, and the 1x1x1
    heads with their loss weights. 10 inches wide (a full-width cell). Returns the figure."""
    from matplotlib.patches import FancyBboxPatch

    rows = network_levels(model)
    depth = len(rows)
    fig, ax = plt.subplots(figsize=(10, 1.25 * depth + 1.0))
    ax.set_xlim(0, 11.4)
    ax.set_ylim(-depth + 0.4, 1.0)
    ax.axis("off")

    def box(x, y, w, text, colour):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - 0.36), w, 0.72, boxstyle="round,pad=0.02",
                                    fc=colour, ec="#444444", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=9.5, linespacing=1.25)

    def arrow(x0, y0, x1, y1, text="", ls="-", where="right"):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", lw=1.1, ls=ls, color="#444444"))
        if text:
            dx = 0.08 if where == "right" else -0.08
            ax.text((x0 + x1) / 2 + dx, (y0 + y1) / 2, text, fontsize=9, va="center", color="#222222",
                    ha="left" if where == "right" else "right")

    def grid(level):
        return "" if input_shape is None else " at " + "x".join(str(s // 2 ** level) for s in input_shape)

    enc_x, dec_x, head_x, w = 1.6, 5.35, 8.6, 3.0
    mid_x = (enc_x + dec_x) / 2
    for r in rows:
        lv, y = r["level"], -r["level"]
        last = lv == depth - 1
        x = mid_x if last else enc_x
        box(x, y, w, f"level {lv}: {r['channels']} ch{grid(lv)}\n{r['encoder']}", "#dbe9f6")
        if r["down"]:
            arrow(enc_x, y + 1 - 0.38, x - (1.0 if last else 0), y + 0.38, r["down"], where="left")
        if last:
            continue
        box(dec_x, y, w, f"level {lv}: {r['channels']} ch{grid(lv)}\n{r['decoder']}", "#fde2c8")
        arrow(enc_x + w / 2, y, dec_x - w / 2, y, ls="--")
        ax.text(mid_x, y + 0.1, "skip", fontsize=9, ha="center", va="bottom", color="#222222")
        from_x = mid_x + 1.0 if lv + 1 == depth - 1 else dec_x
        arrow(from_x, y - 1 + 0.38, dec_x, y - 0.38, "transposed conv")
        if r["head_weight"] is not None:
            name = "output" if lv == 0 else "head"
            text = f"1x1x1 {name}: {model.config.num_classes} scores"
            if len(model.heads) > 1:
                text += f"\nloss weight {r['head_weight']:.2f}"
            box(head_x, y, 2.3, text, "#e5f5e0")
            arrow(dec_x + w / 2, y, head_x - 1.15, y)
    ax.text(enc_x, 0.72, "encoder", ha="center", fontsize=11, weight="bold")
    ax.text(dec_x, 0.72, "decoder", ha="center", fontsize=11, weight="bold")
    if len(model.heads) > 1:
        ax.text(head_x, 0.72, "heads (deep supervision)", ha="center", fontsize=11, weight="bold")
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def head_predictions(model, x) -> list[tuple[str, np.ndarray]]:
    """What each head of ``model`` predicts for ``x`` (N=1), the full-resolution output first: its
    own arg-max at its own grid, repeated to the input's grid for display.

    Example:
        >>> import torch
        >>> from hipseg_lib.model import ModelConfig, ResUNet3D
        >>> net = ResUNet3D(ModelConfig(base_channels=4, depth=3))
        >>> [name for name, _ in head_predictions(net, torch.zeros(1, 1, 16, 16, 8))]
        ['output (full grid)', 'level 1 head (1/2 grid)']
    """
    import torch

    was_training = model.training
    model.train()  # with deep supervision, every head's scores come back in training mode
    try:
        with torch.no_grad():
            outs = model(x)
    finally:
        model.train(was_training)
    outs = outs if isinstance(outs, list) else [outs]
    rows = []
    for level, logits in enumerate(outs):
        factor = x.shape[2] // logits.shape[2]
        lab = logits.float().argmax(1)[0].cpu().numpy().astype(np.uint8)
        full = lab.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
        rows.append(("output (full grid)" if level == 0 else f"level {level} head (1/{factor} grid)", full))
    return rows


def heads_panel(model, image, truth, index: int | None = None):
    """One axial slice: the truth, then what each head predicts (:func:`head_predictions`).
    ``image`` and ``truth`` are a preprocessed volume and its labels on the network's grid. Three
    panels a row, 10 inches wide (a full-width cell). Returns the figure."""
    import torch

    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
    x = x.to(next(model.parameters()).device)
    rows = [("truth", np.asarray(truth))] + head_predictions(model, x)
    index = prostate_slice(np.asarray(truth)) if index is None else index
    ncol = min(3, len(rows))
    nrow = -(-len(rows) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(10, 3.6 * nrow + 0.6), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_axis_off()
    for ax, (name, lab) in zip(axes.flat, rows):
        show_slice(ax, image, lab, axis=2, index=index, title=name)
    spare = axes.flat[len(rows):]
    if len(spare):  # the legend fills the grid's empty place instead of a strip under it
        class_legend(spare[0], loc="center", ncol=1)
        fig.tight_layout(h_pad=1.5)
    else:
        class_legend(fig)
        fig.tight_layout(rect=(0, 0.06, 1, 1), h_pad=1.5)
    return fig
