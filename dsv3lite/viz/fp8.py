"""Pictures of notebooks 04 and 05: FP8 mixed precision (report §3.3) and its kernels.

Two diagrams of the ideas, drawn for this course:

* ``fp8_flow_figure`` — which tensors of one linear layer are FP8 and which stay in higher
  precision, for its three GEMMs (Fprop, Dgrad, Wgrad);
* ``fp8_tiles_figure`` — where the scales live (1×128 activation tiles, 128×128 weight blocks)
  and how the tensor core's short accumulator is promoted to FP32 every N_C elements.

Their labels read the group size from ``dsv3lite.fp8.quant.BLOCK`` when drawn, so the picture
states what the package computes, not a number typed twice. ``program_order_figure`` draws the
GEMM's program-id → tile order for several GROUP_M (notebook 05). The rest is the notebooks'
plotting plumbing, kept here so that their cells carry the idea and not the axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from .diagram import arrow, box, canvas, tint
from .style import COLORS, legend_outside

# one colour per precision, the same in every picture of these notebooks
PRECISION_COLORS = {"FP8": COLORS[3], "BF16": COLORS[0], "FP32": COLORS[2]}
WGMMA_K = 32  # products one FP8 warpgroup MMA of Hopper adds per output (K of the instruction)
SMS = 132  # an H200's streaming multiprocessors: one wave of GEMM programs


def _block() -> int:
    """The package's group size (1×BLOCK tiles, BLOCK×BLOCK blocks, promotion every BLOCK)."""
    from ..fp8 import quant

    return int(quant.BLOCK)


def _precision_key(fig, handles_extra: Sequence = ()) -> None:
    """The colour key, below the drawing (never over it)."""
    handles = [
        Rectangle((0, 0), 1, 1, fc=tint(c, 0.18), ec=c, lw=1.5, label=name)
        for name, c in PRECISION_COLORS.items()
    ]
    fig.legend(
        handles=[*handles, *handles_extra],
        loc="lower center",
        ncol=len(handles) + len(handles_extra),
        bbox_to_anchor=(0.5, 0.0),
    )


# ------------------------------------------------------------------------------ the diagrams
def fp8_flow_figure():
    """One linear layer y = x·Wᵀ in training, as DeepSeek-V3's mixed-precision framework runs
    it (report §3.3.1): all three GEMMs take FP8 operands and accumulate in FP32.

    * **Fprop** y = x·Wᵀ: x quantized in 1×128 tiles, W in 128×128 blocks, output in BF16;
    * **Dgrad** dx = dy·W: the output gradient quantized, the same FP8 weight, output BF16;
    * **Wgrad** dW = dyᵀ·x: dy, and the FP8 copy of x *cached* by Fprop (kept instead of x
      itself, half the memory of BF16: §3.3.4), both grouped along tokens; output FP32.

    What stays in higher precision is what accumulates over many steps or must not lose small
    updates: the FP32 master weight, the FP32 weight gradient, the optimizer's moments (BF16 in
    the report). Each box is coloured by the precision its tensor is held in.
    """
    fp8, bf16, fp32 = (PRECISION_COLORS[k] for k in ("FP8", "BF16", "FP32"))
    fig, ax = canvas(11, 5.6, (0, 10.6), (-1.0, 5.9), equal=False)
    w, h = 1.9, 0.75
    col = [1.65, 4.05, 6.55, 9.35]  # the centres of the four columns of blocks
    fprop, weight, dgrad, wgrad, optim = 4.975, 3.875, 2.775, 0.975, -0.475  # rows' centres

    def block(c, y, text, color, alpha=0.18):
        box(ax, col[c], y, w, h, text, alpha, edge=color, lw=1.5)

    def link(c0, y0, c1, y1, dy1=0.0):  # right edge of one block to the left edge of another
        return arrow(ax, (col[c0] + w / 2, y0), (col[c1] - w / 2, y1 + dy1))

    rows = {"Fprop  y = x·Wᵀ": fprop, "Dgrad  dx = dy·W": dgrad, "Wgrad  dW = dyᵀ·x": wgrad}
    for name, y in rows.items():
        block(2, y, "FP8 GEMM\naccumulate FP32", fp8, alpha=0.4)
        ax.text(col[2], y + h / 2 + 0.1, name, ha="center", fontsize=10, weight="bold")
    block(0, fprop, "input x\nBF16", bf16)
    block(1, fprop, "x  FP8\n1×128 tiles", fp8)
    block(0, weight, "master weight W\nFP32", fp32)
    block(1, weight, "W  FP8\n128×128 blocks", fp8)
    block(3, fprop, "output y\nBF16", bf16)
    link(0, fprop, 1, fprop)
    link(0, weight, 1, weight)
    link(1, fprop, 2, fprop, dy1=0.15)
    link(1, weight, 2, fprop, dy1=-0.15)
    link(2, fprop, 3, fprop)
    block(0, dgrad, "output grad dy\nBF16", bf16)
    block(1, dgrad, "dy  FP8\n1×128 tiles", fp8)
    block(3, dgrad, "input grad dx\nBF16", bf16)
    link(0, dgrad, 1, dgrad)
    link(1, dgrad, 2, dgrad, dy1=-0.15)
    link(1, weight, 2, dgrad, dy1=0.15)
    link(2, dgrad, 3, dgrad)
    block(1, wgrad, "dyᵀ FP8, xᵀ FP8\n128×1 tiles", fp8)
    block(3, wgrad, "weight grad dW\nFP32", fp32)
    arrow(ax, (col[0], dgrad - h / 2), (col[1] - w / 2, wgrad), rad=0.25)
    right = col[1] + w / 2  # x cached by Fprop, down the right side of its column
    cached = arrow(ax, (right, fprop - h / 2 + 0.2), (right, wgrad + h / 2 - 0.1), dashed=True)
    cached.set_connectionstyle("bar,fraction=-0.08")
    ax.text(right + 0.32, 1.75, "x cached\nin FP8", fontsize=9, color="0.25", ha="left")
    link(1, wgrad, 2, wgrad)
    link(2, wgrad, 3, wgrad)
    block(0, optim, "optimizer: AdamW\nmoments BF16", bf16)
    to_optim = arrow(ax, (col[3], wgrad - h / 2), (col[0] + w / 2, optim))
    to_optim.set_connectionstyle("angle,angleA=-90,angleB=0")
    update = arrow(ax, (col[0] - w / 2, optim), (col[0] - w / 2, weight))
    update.set_connectionstyle("bar,fraction=-0.09")
    ax.text(0.22, 1.4, "update W", fontsize=9, color="0.25", rotation=90, va="center")
    ax.set_title("one linear layer in training: FP8 operands, FP32 accumulation")
    _precision_key(fig)
    return fig


def fp8_tiles_figure():
    """Fine-grained quantization and increased-precision accumulation (report §3.3.2).

    Left: an activation [M, K] gets one scale per token per BLOCK channels (1×BLOCK tiles), a
    weight [N, K] one per BLOCK×BLOCK block; both groups run along K, the GEMM's inner
    dimension, so each BLOCK-wide step of K sees a single scale per row of each operand.
    Right: inside one such step the tensor core's MMAs add BLOCK products in its own limited
    precision (~14 bits on Hopper); every N_C = BLOCK elements that partial sum is promoted
    into an FP32 register on the CUDA cores, multiplied by the two scales on the way. BLOCK is
    read from ``dsv3lite.fp8.quant`` at draw time.
    """
    block = _block()
    fp8, fp32 = PRECISION_COLORS["FP8"], PRECISION_COLORS["FP32"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=[1, 1.25])
    # left: the groups of each operand, K running to the right in both
    ax0.set(xlim=(-0.3, 4.3), ylim=(-0.9, 7.2))
    ax0.axis("off")
    ax0.set_title(f"fine-grained scales: 1×{block} tiles, {block}×{block} blocks")
    k_groups = 4
    for r in range(5):  # activation: 5 tokens × 4 tiles
        for j in range(k_groups):
            shade = 0.2 + 0.15 * ((r + j) % 2)
            ax0.add_patch(Rectangle((j, 5.9 - r * 0.42), 0.94, 0.34, fc=tint(fp8, shade)))
            ax0.plot(j + 0.84, 6.07 - r * 0.42, "o", ms=4, color=fp32)
    ax0.text(2, 6.5, f"activation x [M, K]: a scale per 1×{block} tile", ha="center")
    for r in range(2):  # weight: 2 × 4 blocks
        for j in range(k_groups):
            shade = 0.2 + 0.15 * ((r + j) % 2)
            ax0.add_patch(Rectangle((j, 1.45 - r * 1.5), 0.94, 1.42, fc=tint(fp8, shade)))
            ax0.plot(j + 0.84, 2.7 - r * 1.5, "o", ms=5, color=fp32)
    ax0.text(2, 3.2, f"weight W [N, K]: a scale per {block}×{block} block", ha="center")
    ax0.annotate("", xy=(0, 3.75), xytext=(0.94, 3.75), arrowprops={"arrowstyle": "|-|"})
    ax0.text(1.05, 3.75, f"{block} channels of K", va="center", fontsize=9)
    ax0.text(4.05, -0.65, "K →", ha="right", fontsize=9, color="0.3")
    ax0.plot([], [], "o", color=fp32, label="its FP32 scale s = amax / 448")
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0))
    # right: one output's accumulation along K
    n_steps = 4
    ax1.set(xlim=(-0.3, n_steps * 2.4 + 0.3), ylim=(-0.4, 4.6))
    ax1.axis("off")
    ax1.set_title(f"promotion to FP32 every N_C = {block} elements of K")
    mmas = max(block // WGMMA_K, 1)
    for step in range(n_steps):
        x0 = step * 2.4
        for i in range(mmas):
            width = 2.2 / mmas
            ax1.add_patch(
                Rectangle((x0 + i * width, 2.7), width * 0.92, 0.7, fc=tint(fp8, 0.35), ec=fp8)
            )
        ax1.text(x0 + 1.1, 3.55, f"{mmas} MMAs × {WGMMA_K}", ha="center", fontsize=9)
        ax1.text(
            x0 + 1.1, 2.35, "Tensor Core: ~14-bit\npartial sum", ha="center", fontsize=9, va="top"
        )
        arrow(ax1, (x0 + 1.1, 1.65), (x0 + 1.1, 1.05), color=fp32)
        ax1.text(x0 + 1.2, 1.33, "× s_a · s_b", fontsize=9, color="0.25", va="center")
    ax1.annotate("", xy=(0, 4.0), xytext=(2.2, 4.0), arrowprops={"arrowstyle": "|-|"})
    ax1.text(1.1, 4.25, f"N_C = {block} elements", ha="center", va="bottom")  # above the caps
    ax1.add_patch(Rectangle((0, 0.25), n_steps * 2.4 - 0.2, 0.75, fc=tint(fp32, 0.2), ec=fp32))
    ax1.text(
        n_steps * 1.2,
        0.62,
        "CUDA cores: FP32 accumulator  acc += partial · s_a · s_b",
        ha="center",
        va="center",
        fontsize=10,
    )
    ax1.text(n_steps * 1.2, -0.2, "K →", ha="center", fontsize=9, color="0.3")
    return fig


def launch_order(m_tiles: int, n_tiles: int, group_m: int) -> np.ndarray:
    """order[pid_m, pid_n]: the program id that computes each output tile, with program ids
    walked GROUP_M tiles down M before one step right along N (Triton's matmul tutorial).
    The same arithmetic as the GEMM kernel's first lines, in NumPy."""
    pid = np.arange(m_tiles * n_tiles)
    group_size = group_m * n_tiles
    first_m = (pid // group_size) * group_m
    rows_in_group = np.minimum(m_tiles - first_m, group_m)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    order = np.empty((m_tiles, n_tiles), dtype=int)
    order[pid_m, pid_n] = pid
    return order


def wave_reads(order: np.ndarray, wave: int = SMS) -> tuple[int, int]:
    """(row tiles of a, column tiles of b) that the first ``wave`` programs read: what one
    wave pulls from memory; every other read of those tiles can come from L2."""
    first = order < wave
    return int(first.any(axis=1).sum()), int(first.any(axis=0).sum())


def program_order_figure(group_ms: Sequence[int] = (1, 8), m_tiles: int = 64, n_tiles: int = 56):
    """The launch order on a GEMM's tile grid (default: M = 4096, N = 7168 in 64×128 tiles),
    one panel per GROUP_M: the first four waves of ``SMS`` programs in colour, later ones grey,
    and the path of the first program ids in black. With GROUP_M = 1 a wave sweeps whole rows
    of tiles and needs every column tile of b; grouping packs it into a squarer patch that
    reads fewer distinct tiles from memory — every other read of them can hit L2."""
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([*COLORS[:4], "0.88"])
    fig, axes = plt.subplots(1, len(group_ms), figsize=(5.5 * len(group_ms), 4), squeeze=False)
    for ax, group_m in zip(axes[0], group_ms, strict=True):
        order = launch_order(m_tiles, n_tiles, group_m)
        rows, cols = wave_reads(order)
        ax.imshow(
            np.minimum(order // SMS, 4),
            cmap=cmap,
            vmin=-0.5,
            vmax=4.5,
            aspect="auto",
            interpolation="nearest",
        )
        first = [np.argwhere(order == pid)[0] for pid in range(3 * max(group_m, 8))]
        ax.plot([c for _, c in first], [r for r, _ in first], "k.-", lw=1, ms=3)
        ax.set(xlabel="pid_n (column tiles of b)", ylabel="pid_m (row tiles of a)")
        ax.set_title(
            f"GROUP_M = {group_m}: wave 1 reads {rows} tiles of a\n"
            f"+ {cols} tiles of b = {rows + cols} tiles"
        )
    handles = [Rectangle((0, 0), 1, 1, color=COLORS[i], label=f"wave {i + 1}") for i in range(4)]
    handles.append(Rectangle((0, 0), 1, 1, color="0.88", label="later waves"))
    handles.append(plt.Line2D([], [], color="k", marker=".", label="program ids 0, 1, 2, …"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=6)
    return fig


# ------------------------------------------------------------------------------ notebook 04
def fp8_grid_figure(grid: dict, formats: dict):
    """Every positive finite value of each FP8 format on a log axis (left; shaded: the
    subnormals), and the gap to the next value relative to the value (right): a comb whose
    teeth repeat every binade, and a spacing that stops shrinking below the normal range."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.2))
    for row, (name, v) in enumerate(grid.items()):
        f = formats[name]
        ax0.fill_betweenx(
            [row - 0.4, row + 0.4],
            f["min_subnormal"],
            f["min_normal"],
            color="0.6",
            alpha=0.3,
            lw=0,
        )
        ax0.vlines(v, row - 0.35, row + 0.35, color=COLORS[row], lw=0.6)
        ax1.step(v[:-1], (v[1:] - v[:-1]) / v[:-1], where="post", color=COLORS[row], label=name)
    ax0.set(xscale="log", yticks=range(len(grid)), yticklabels=[n.upper() for n in grid])
    ax0.set(ylim=(-0.6, len(grid) - 0.4), xlabel="positive values (shaded: subnormals)")
    ax0.set_title(" vs ".join(f"{len(v)} {n.upper()}" for n, v in grid.items()) + " values")
    ax1.set(xscale="log", yscale="log", xlabel="value", ylabel="gap to next / value")
    ax1.set_title("relative spacing: E4M3 is twice as fine")
    legend_outside(ax1)
    return fig


def log2_codes(x, granularity: str, where, granularities: dict):
    """log2 |x / s| of the columns ``where``, s the scale of each element's group: where the
    values land on the E4M3 grid (448 is its top, 2^-6 its smallest normal)."""
    rows, cols = granularities[granularity]
    rows, cols = rows or x.shape[0], cols or x.shape[1]
    groups = x.abs().unflatten(0, (-1, rows)).unflatten(2, (-1, cols))  # [M/r, r, K/c, c]
    codes = groups / (groups.amax(dim=(1, 3), keepdim=True) / 448)
    return codes.flatten(2).flatten(0, 1)[:, where].log2().flatten()


def code_histogram(x, where, errors: dict, e4m3: dict, granularities: dict):
    """Histograms of ``log2_codes`` for three granularities, with E4M3's landmarks: where one
    scale per tensor pushes the ordinary channels (off the grid, to zero) and where a tile
    keeps them."""
    fig, ax = plt.subplots(figsize=(11, 3.2))
    bins = np.linspace(-24, 10, 69)
    for i, g in enumerate(("tensor", "128x128", "1x128")):
        values = log2_codes(x, g, where, granularities).numpy()
        ax.hist(
            values,
            bins=bins,
            histtype="step",
            lw=1.5,
            color=COLORS[i],
            label=f"{g}: error {errors[g]:.1%}",
        )
    for value, label, ha in (
        (e4m3["min_subnormal"], "smallest subnormal ", "right"),
        (e4m3["min_normal"], " smallest normal", "left"),
        (448, "448", "center"),
    ):  # landmarks labelled above the axes, off the histograms
        ax.axvline(math.log2(value), color="0.5", ls="--", lw=1)
        ax.text(
            math.log2(value),
            1.02,
            label,
            transform=ax.get_xaxis_transform(),
            ha=ha,
            va="bottom",
            fontsize=9,
            color="0.35",
        )
    ax.set(xlabel="log2 |x / s|  (ordinary channels)", ylabel="count")
    ax.set_title("one scale per tensor pushes the ordinary channels off the E4M3 grid", pad=22)
    legend_outside(ax)
    return fig


def granularity_bars(groups: dict, granularities: Sequence[str], reference: float):
    """Quantization error per input (bars) and granularity (colours), log scale; the dotted
    line is ``reference`` (E4M3's error on plain Gaussians)."""
    fig, ax = plt.subplots(figsize=(11, 3.4))
    width = 0.8 / len(granularities)
    for i, g in enumerate(granularities):
        xs = [j + (i - (len(granularities) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [errs[g] for errs in groups.values()], width, label=g, color=COLORS[i])
    ax.set_xticks(range(len(groups)), [name.replace(", ", ",\n") for name in groups])
    ax.axhline(reference, color="0.4", ls=":", lw=1.2, label=f"Gaussian, 1x128: {reference:.2%}")
    ax.set(yscale="log", ylabel="‖Q(x) − x‖ / ‖x‖")
    ax.set_title("quantization error by granularity")
    legend_outside(ax)
    return fig


def accumulation_curves(k_grid: Sequence[int], curves: dict, report_point: tuple | None = None):
    """Max relative error of a dot product against K, one curve per accumulator setup; the
    report's point (K, error) as a star. Legend beside the axes, never over the curves."""
    fig, ax = plt.subplots(figsize=(10, 3.4))
    for i, (label, c) in enumerate(curves.items()):
        ax.plot(k_grid, c, "o-", ms=4, color=COLORS[i], label=label)
    if report_point:
        ax.plot(*report_point[:2], "*", ms=14, color=COLORS[3], label=report_point[2])
    ax.set(xscale="log", yscale="log", xlabel="K (inner dimension)", ylabel="max relative error")
    ax.set_xticks(k_grid, [str(k) for k in k_grid])
    ax.set_title("a ~14-bit accumulator, with and without promotion to FP32")
    legend_outside(ax)
    return fig


def accumulation_tradeoff_figure(
    errors: Callable,
    n_c: int | None,
    k: int,
    k_grid: Sequence[int],
    n_cs: Sequence[int],
    unpromoted: Sequence[float],
):
    """The widget's picture. Left: max error against K without promotion and with promotion
    every ``n_c``. Right, at one K: the error for every N_C and the promotions each output pays
    (K / N_C multiply-adds on the CUDA cores). ``errors(k, n_c, trials)`` returns the trials'
    relative errors (a tensor)."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax0.plot(k_grid, unpromoted, "o-", ms=3, color=COLORS[0], label="no promotion")
    if n_c is not None:
        ks = [kk for kk in k_grid if kk >= n_c]
        ax0.plot(
            ks,
            [errors(kk, n_c).max().item() for kk in ks],
            "o-",
            ms=3,
            color=COLORS[1],
            label=f"N_C = {n_c}",
        )
    ax0.axvline(k, color="0.5", ls=":", lw=1)
    ax0.set(xscale="log", yscale="log", xlabel="K", ylabel="max relative error", ylim=(1e-4, 0.2))
    ax0.set_title("error against K")
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    n_cs = [c for c in n_cs if c <= k]
    errs = [errors(k, c, 100).max().item() for c in n_cs]
    ax1.plot(n_cs, errs, "o-", ms=4, color=COLORS[1], label="max relative error")
    ax1.axhline(
        unpromoted[list(k_grid).index(k)], color=COLORS[0], ls="--", lw=1, label="no promotion"
    )
    if n_c in n_cs:
        ax1.plot([n_c], [errs[n_cs.index(n_c)]], "o", ms=10, mfc="none", color=COLORS[3])
    ax1.set(xscale="log", yscale="log", xlabel="N_C", ylabel="max relative error", ylim=(1e-5, 0.2))
    ax1.set_xticks(n_cs, [str(c) for c in n_cs])
    promotions = ax1.twinx()
    promotions.plot(
        n_cs, [k // c for c in n_cs], "s:", ms=3, color=COLORS[2], label="promotions per output"
    )
    promotions.set(yscale="log", ylabel="K / N_C")
    ax1.set_title(f"the trade-off at K = {k}")
    lines = ax1.get_legend_handles_labels()[0] + promotions.get_legend_handles_labels()[0]
    ax1.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    plt.close(fig)  # shown through a display handle, not by the inline backend
    return fig


def loss_gap_figure(steps, loss: dict, val: dict, gap, baseline: str, bound: float):
    """Left: both runs' training loss. Right: their relative gap per step (%), with the
    report's ±``bound`` % band."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax0.plot(steps, loss["full"], label=f"{baseline} (val {val['full']:.3f})")
    ax0.plot(steps, loss["fp8"], "--", label=f"FP8 recipe (val {val['fp8']:.3f})")
    ax0.set(xlabel="step", ylabel="train loss (nats/token)")
    ax0.set_title("same seed, same batches")
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax1.axhspan(-bound, bound, color=COLORS[2], alpha=0.15, label=f"±{bound}% (report)")
    ax1.plot(steps, 100 * gap, "o-", ms=3, color=COLORS[1], label="(FP8 − base) / base")
    ax1.axhline(0, color="0.5", lw=0.8)
    ax1.set(xlabel="step", ylabel="relative loss gap (%)")
    ax1.set_title("the gap, step by step")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    return fig


# ------------------------------------------------------------------------------ notebook 05
def groupings_figure():
    """The three groupings of the quantizers on a 256×256 corner of a tensor, one colour per
    scale: 1×BLOCK (activations, output gradients), BLOCK×1 (Wgrad's operands), BLOCK×BLOCK
    (weights). Thin groups: one in 16 drawn, or the picture turns solid."""
    block = _block()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    titles = [f"1x{block}: x, dy", f"{block}x1: x and dy for Wgrad", f"{block}x{block}: weights"]
    for ax, title, (h, w) in zip(axes, titles, [(1, block), (block, 1), (block, block)]):
        cells = [(r, c) for r in range(0, 2 * block, h) for c in range(0, 2 * block, w)]
        drawn = [(r, c) for r, c in cells if not ((h == 1 and r % 16) or (w == 1 and c % 16))]
        for i, (r, c) in enumerate(drawn):  # neighbouring groups in different colours
            hd, wd = max(h, 6), max(w, 6)  # a 1-wide group drawn 6 wide, or it is invisible
            color = COLORS[(i + r // block) % len(COLORS)]  # the two token groups differ
            ax.add_patch(Rectangle((c, r), wd, hd, color=color, alpha=0.7, lw=0))
        ax.set(xlim=(0, 2 * block), ylim=(2 * block, 0), title=title, xlabel="channels")
        ax.set_xticks([0, block, 2 * block])
        ax.set_yticks([0, block, 2 * block])
        ax.grid(True, color="0.5", lw=0.5)
    axes[0].set_ylabel("tokens")
    fig.suptitle("one scale per coloured group (thin groups: every 16th drawn, thickened)")
    return fig


def outlier_tile_figure(x_out, deq, scale, split: int):
    """Left: one token's magnitudes and the E4M3 grid of each of its tiles (448·s at the top,
    2^-6·s where subnormals begin, 2^-9·s the smallest). Right: the relative error per channel,
    averaged over tokens. ``scale``: token 0's scale per channel; ``split``: the tile border."""
    channel = np.arange(x_out.shape[1])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax0.semilogy(channel, x_out[0].abs(), ".", ms=3, color=COLORS[0], label="|x|, token 0")
    for factor, ls, label in (
        (448, "-", "448·s"),
        (2**-6, "--", "$2^{-6}$·s (subnormals below)"),
        (2**-9, ":", "$2^{-9}$·s (smallest)"),
    ):
        ax0.step(channel, factor * scale, where="mid", color=COLORS[3], ls=ls, lw=1, label=label)
    ax0.set(xlabel="channel", ylabel="magnitude", ylim=(1e-6, 1e8))
    ax0.set_title("token 0 and the E4M3 grid of its tiles")
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax1.semilogy(channel, ((deq - x_out).abs() / x_out.abs()).mean(dim=0), ".", ms=3)
    ax1.set(xlabel="channel", ylabel="|q·s − x| / |x|")
    ax1.set_title("mean over the tokens")
    for ax in (ax0, ax1):
        ax.axvline(split - 0.5, color="0.5", lw=1)
    return fig


def benchmark_figure(bench: dict):
    """The recorded FP8 benchmark: TFLOP/s of our GEMM, cuBLAS bf16 and cuBLAS blockwise FP8
    per shape (left, labelled ours / cuBLAS blockwise), and the quantizers' GB/s against a
    device-to-device copy (right)."""
    value = {r["name"]: r["value"] for r in bench["rows"]}
    shapes = [r["shape"] for r in bench["rows"] if r["name"].startswith("gemm ours")]
    kinds = [
        ("ours", "ours (Triton)"),
        ("bf16", "cuBLAS bf16"),
        ("cublas-blockwise", "cuBLAS blockwise FP8"),
    ]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=[3, 1])
    width = 0.27
    for i, (kind, label) in enumerate(kinds):
        ax0.bar(
            [j + (i - 1) * width for j in range(len(shapes))],
            [value[f"gemm {kind} {sh}"] for sh in shapes],
            width,
            label=label,
            color=COLORS[i],
        )
    for j, sh in enumerate(shapes):
        ratio = value[f"gemm ours {sh}"] / value[f"gemm cublas-blockwise {sh}"]
        ax0.text(j - width, value[f"gemm ours {sh}"] + 20, f"{ratio:.2f}", ha="center", fontsize=9)
    ax0.set_xticks(range(len(shapes)), [sh.replace(" K", "\nK") for sh in shapes])
    ax0.set(ylabel="TFLOP/s")
    ax0.set_title(f"FP8 GEMM on one {bench['env']['device']} (label: ours / cuBLAS blockwise)")
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    bw = [("copy d2d", "copy"), ("act_quant 1x128", "1x128"), ("act_quant_t 128x1", "128x1 T")]
    ax1.bar(
        [label for _, label in bw], [value[n] for n, _ in bw], color=["0.6", COLORS[0], COLORS[0]]
    )
    ax1.set(ylabel="GB/s")
    ax1.set_title("quantizers, 16384×7168")
    return fig
