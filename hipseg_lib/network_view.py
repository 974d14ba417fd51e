"""The network as a picture, drawn from the network object itself (so it cannot drift from the
code), and what each of its output heads predicts.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .viz import class_legend, prostate_slice, show_slice

__all__ = ["network_levels", "network_diagram", "head_predictions", "deep_supervision_panel"]


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
    drift from the code): per level, its channels (and the decoder's, which are twice as many
    where the decoder has no convolution and passes the concatenation on), the encoder and
    decoder blocks, how it is reached from the level above, and whether a head reads it.

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
        # a decoder level without a convolution passes on the concatenation: up + skip channels
        dec_ch = None if dec is None else widths[i] * (2 if dec.startswith("no conv") else 1)
        rows.append({"level": i, "channels": widths[i], "down": down, "encoder": enc, "decoder": dec,
                     "decoder_channels": dec_ch, "deep_supervision": 1 <= i <= aux})
    return rows

def network_diagram(model, title: str = "", input_shape: tuple[int, int, int] | None = None):
    """The U of ``model`` (a :class:`~hipseg_lib.model.ResUNet3D`): one box per level and side with
    its channels, grid (for ``input_shape``) and block; the downsampling between levels, the skip
    connections, the 1x1x1 heads and, with deep supervision, the sum of their upsampled scores.
    Drawn 10 inches wide (a full-width cell). Returns the figure."""
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
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="-|>", lw=1.1, ls=ls,
                                                                      color="#444444"))
        if text:
            dx = 0.08 if where == "right" else -0.08
            ax.text((x0 + x1) / 2 + dx, (y0 + y1) / 2, text, fontsize=9, va="center", color="#222222",
                    ha="left" if where == "right" else "right")

    def grid(level):
        return "" if input_shape is None else " at " + "x".join(str(s // 2 ** level) for s in input_shape)

    enc_x, dec_x, head_x, sum_x, w = 1.6, 5.35, 8.2, 9.95, 3.0
    mid_x = (enc_x + dec_x) / 2
    heads = [r["level"] for r in rows if r["deep_supervision"]]
    for r in rows:
        lv, y = r["level"], -r["level"]
        last = lv == depth - 1
        x = mid_x if last else enc_x
        box(x, y, w, f"level {lv}: {r['channels']} ch{grid(lv)}\n{r['encoder']}", "#dbe9f6")
        if r["down"]:
            arrow(enc_x, y + 1 - 0.38, x - (1.0 if last else 0), y + 0.38, r["down"], where="left")
        if last:
            continue
        box(dec_x, y, w, f"level {lv}: {r['decoder_channels']} ch{grid(lv)}\n{r['decoder']}", "#fde2c8")
        arrow(enc_x + w / 2, y, dec_x - w / 2, y, ls="--")
        ax.text(mid_x, y + 0.1, "skip", fontsize=9, ha="center", va="bottom", color="#222222")
        from_x = mid_x + 1.0 if lv + 1 == depth - 1 else dec_x
        arrow(from_x, y - 1 + 0.38, dec_x, y - 0.38, "transposed conv")
        if lv == 0 or lv in heads:
            box(head_x, y, 1.7, f"1x1x1 head\n{model.config.num_classes} class scores", "#e5f5e0")
            arrow(dec_x + w / 2, y, head_x - 0.85, y)
    if heads:  # the coarse heads' scores, upsampled, join the output's in a sum
        ax.plot([sum_x, sum_x], [-max(heads), 0.0], color="#444444", lw=1.1)
        arrow(head_x + 0.85, 0.0, sum_x - 0.2, 0.0)
        ax.plot(sum_x, 0.0, "o", ms=24, mfc="#ffffff", mec="#444444", mew=1.2)
        ax.text(sum_x, 0.0, "+", ha="center", va="center", fontsize=14, weight="bold")
        for lv in heads:
            ax.plot([head_x + 0.85, sum_x], [-lv, -lv], color="#444444", lw=1.1)
        ax.text(sum_x + 0.12, -max(heads) / 2, "upsampled\nand added", fontsize=9, va="center", ha="left")
        ax.text(sum_x, 0.45, "output", ha="center", fontsize=10, weight="bold")
    else:
        ax.text(head_x, 0.55, "output", ha="center", fontsize=10, weight="bold")
    ax.text(enc_x, 0.72, "encoder", ha="center", fontsize=11, weight="bold")
    ax.text(dec_x, 0.72, "decoder", ha="center", fontsize=11, weight="bold")
    if title:
        ax.set_title(title, fontsize=11)
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
    on the network's grid. Three panels a row, 10 inches wide (a full-width cell). Returns the figure."""
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
