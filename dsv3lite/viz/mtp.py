"""Pictures of notebook 03: the MTP modules chained after the main model, and the plots of
training with MTP and of self-speculative decoding.

``mtp_figure`` draws report §2.2's sequential modules for the configuration it is given; the
other functions draw what notebook 03 measures, so that its cells keep only the idea. The boxes
and arrows are ``dsv3lite.viz.diagram``'s, the slider is ``dsv3lite.viz.widgets``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..config import ModelConfig, preset
from .diagram import BLUE, GREEN, GREY, ORANGE, PINK, RED, SKY, arrow, box, canvas, path
from .style import legend_outside
from .widgets import explorer

__all__ = [
    "acceptance_explorer",
    "loss_curves_figure",
    "mtp_figure",
    "sampling_figure",
    "timeline_figure",
]

COL_W, GAP = 3.4, 0.9  # a column's width and the space between columns


def mtp_figure(config: ModelConfig | None = None, depth: int | None = None) -> Figure:
    """The main model and ``depth`` MTP modules (report §2.2, eqs. 21–23), with the numbers of
    ``config`` (the ``tiny`` preset by default; ``depth`` defaults to its
    ``num_nextn_predict_layers``). Module k normalises the previous depth's state h^{k-1}_i and
    the embedding of token t_{i+k}, concatenates them, projects with M_k, runs one Transformer
    block and predicts t_{i+k+1} through the output head. The embedding and the head are one
    matrix each, shared with the main model (drawn once per column, linked by dashes)."""
    c = config or preset("tiny")
    d = c.num_nextn_predict_layers if depth is None else depth
    if d < 1:
        raise ValueError(f"depth must be at least 1, got {d}")
    width = (d + 1) * (COL_W + GAP)
    fig, ax = canvas(3.3 * (d + 1) + 0.6, 6.4, (0, width), (0, 9.0), equal=False)
    for k in range(d + 1):
        x = k * (COL_W + GAP) + 0.2
        _column(ax, x, k, c)
        if k:
            # h^{k-1} from the previous column's top block into this one's hnorm
            prev = x - GAP - COL_W
            path(ax, [(prev + COL_W, 5.6), (x - GAP / 2, 5.6), (x - GAP / 2, 2.75),
                           (x, 2.75)], RED)  # fmt: skip
            ax.text(x - GAP / 2 - 0.08, 4.1, f"$h^{{{k - 1}}}_i$", ha="right", fontsize=11,
                    color=RED)  # fmt: skip
    for k in range(d):  # the shared embedding and head: one matrix each, dashes in the gaps
        right = k * (COL_W + GAP) + 0.2 + COL_W
        ax.plot([right, right + GAP], [6.95, 6.95], ls=(0, (3, 3)), c=GREEN, lw=1.5)
        ax.plot([right, right + GAP + 1.75], [0.95, 0.95], ls=(0, (3, 3)), c=GREEN, lw=1.5)
    ax.set_title(f"Multi-Token Prediction: the main model ({c.num_hidden_layers} blocks, hidden "
                 f"size {c.hidden_size}) and D = {d} MTP module{'s' * (d > 1)}\n"
                 "the embedding and the output head are the main model's (green dashes)",
                 fontsize=11)  # fmt: skip
    return fig


def _column(ax, x: float, k: int, c: ModelConfig) -> None:
    """Column ``k`` of the picture: the main model (k = 0) or MTP module k."""
    tok = "t_i" if k == 0 else f"t_{{i+{k}}}"
    mid = x + COL_W / 2
    ax.text(mid, 0.1, f"input token ${tok}$", ha="center", va="bottom", fontsize=10)
    left, right = x + 0.825, x + 2.575  # the middles of two half columns, 1.65 wide
    emb = (right, 1.65) if k else (mid, COL_W)  # an MTP module embeds in the right half
    box(ax, emb[0], 1.2, emb[1], 0.9, "Embedding\n(shared)", 0.15, edge=GREEN, lw=1.6)
    if k == 0:
        arrow(ax, (mid, 1.65), (mid, 2.2))
        box(ax, mid, 4.2, COL_W, 4.0, f"main model\n{c.num_hidden_layers} Transformer blocks\n"
                 "(MLA + MoE)\n\nfinal RMSNorm\n" r"→ $h^0_i$", 0.15, edge=BLUE, lw=1.6)  # fmt: skip
        label, loss = "t_{i+1}", r"$\mathcal{L}_{\mathrm{main}}$"
    else:
        box(ax, left, 2.75, 1.65, 0.9, f"RMSNorm\n$(h^{{{k - 1}}}_i)$", 0.15, edge=SKY, lw=1.6)
        box(ax, right, 2.75, 1.65, 0.9, f"RMSNorm\n(Emb(${tok}$))", 0.15, edge=SKY, lw=1.6)
        arrow(ax, (right, 1.65), (right, 2.3))
        box(ax, mid, 4.05, COL_W, 0.9, f"concatenate → projection $M_{k}$\n"
            f"(2 × {c.hidden_size} → {c.hidden_size})", 0.15, edge=PINK, lw=1.6)  # fmt: skip
        for xa in (left, right):
            arrow(ax, (xa, 3.2), (xa, 3.6))
        box(ax, mid, 5.55, COL_W, 1.3, f"Transformer block $\\mathrm{{TRM}}_{k}$\n(MLA + MoE)\n"
            f"→ $h^{k}_i$", 0.15, edge=BLUE, lw=1.6)  # fmt: skip
        arrow(ax, (mid, 4.5), (mid, 4.9))
        label, loss = f"t_{{i+{k + 1}}}", f"$\\mathcal{{L}}^{{{k}}}_{{\\mathrm{{MTP}}}}$"
    arrow(ax, (mid, 6.2), (mid, 6.55))
    box(ax, mid, 6.95, COL_W, 0.8, "Output head (shared)", 0.15, edge=GREEN, lw=1.6)
    arrow(ax, (mid, 7.35), (mid, 7.75))
    ax.text(mid, 7.8, f"predicts ${label}$ → {loss}", ha="center", va="bottom",
            fontsize=11, color=ORANGE if k else "black", weight="bold")  # fmt: skip
    ax.text(mid, 8.45, "main model" if k == 0 else f"MTP module {k}", ha="center",
            va="bottom", fontsize=10, color="#444444")  # fmt: skip


# ----------------------------------------------------------------------- notebook 03's plots
def loss_curves_figure(rows: list[dict]) -> Figure:
    """Training loss of the main head (t_{i+1}) and of MTP depth 1 (t_{i+2}) over a run."""
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(steps, [r["loss"] for r in rows], label="main: $t_{i+1}$")
    ax.plot(steps, [r["mtp_loss"] for r in rows], label="MTP depth 1: $t_{i+2}$")
    ax.axhline(rows[-1]["unigram_entropy"], ls="--", c=GREY, lw=1, label="unigram entropy")
    ax.set(xlabel="step", ylabel="nats / token\n(training batch)", title="Main loss and MTP loss")
    legend_outside(ax)
    return fig


def timeline_figure(outcomes: Sequence[bool], n_forwards: int = 24) -> Figure:
    """Forwards of plain and of speculative decoding: one token per plain forward; two per
    speculative forward whose draft was accepted (green), one when rejected (orange). The
    first forward of both is the prefill."""
    fig, ax = plt.subplots(figsize=(11, 2.3))
    ax.broken_barh([(f, 1) for f in range(n_forwards)], (1.1, 0.7), fc=BLUE, ec="white", alpha=0.7)
    bars, colors, x = [(0, 1)], [BLUE], 1
    for accepted in list(outcomes)[: n_forwards - 1]:
        bars.append((x, 2 if accepted else 1))
        colors.append(GREEN if accepted else ORANGE)
        x += bars[-1][1]
    ax.broken_barh(bars, (0.1, 0.7), fc=colors, ec="white")
    ax.set(xlim=(0, x), ylim=(0, 1.9), yticks=[0.45, 1.45], xlabel="tokens produced")
    ax.set_yticklabels([f"speculative: {n_forwards} forwards", f"plain: {n_forwards} forwards"])
    return fig


def sampling_figure(p: torch.Tensor, q: torch.Tensor, freq: torch.Tensor, rate: float) -> Figure:
    """Speculative sampling on crafted distributions: the draft q, the target p, and the
    frequencies of the tokens the rule returned (they follow p)."""
    fig, ax = plt.subplots(figsize=(8, 3))
    xs = torch.arange(len(p))
    ax.bar(xs - 0.27, q, 0.27, label="q: MTP draft", color=ORANGE)
    ax.bar(xs, p, 0.27, label="p: main model", color=BLUE)
    ax.bar(xs + 0.27, freq, 0.27, label="speculative output", color=GREEN)
    overlap = torch.minimum(p, q).sum()
    ax.set(xlabel="token", ylabel="probability", xticks=xs,
           title=f"accepted {rate:.0%} ≈ Σ min(p, q) = {overlap:.0%}")  # fmt: skip
    legend_outside(ax)
    return fig


def acceptance_explorer(
    pooled: Callable[[float], tuple[float, float, str]],
    temperatures: Sequence[float],
    report_band: tuple[float, float],
    value: float = 1.0,
) -> None:
    """A temperature slider over ``pooled(T) -> (acceptance, tokens per forward, sample)``: the
    curve over ``temperatures`` with the point at T marked, beside the report's acceptance
    band, and the sample decoded at T. The view at ``value`` is drawn when the cell runs, so
    the saved notebook shows it where no kernel moves the slider."""
    import ipywidgets as widgets
    from IPython.display import Pretty

    curve = [pooled(t)[:2] for t in temperatures]

    def draw(temperature: float):
        rate, per_forward, text = pooled(temperature)
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.plot(temperatures, [r for r, _ in curve], "o-", label="acceptance rate")
        ax.plot(temperatures, [f - 1 for _, f in curve], "s--", label="tokens per forward − 1")
        ax.plot([temperature], [rate], "o", ms=13, mfc="none", mec=RED, label=f"T = {temperature}")
        ax.axhspan(*report_band, color=GREY, alpha=0.25, label="the report's acceptance")
        ax.set(xlabel="temperature", ylim=(0, 1.05), title="MTP drafts accepted by the main model")
        legend_outside(ax)
        return fig, Pretty(f"T = {temperature}: {rate:.0%} accepted, {per_forward:.2f} tokens "
                           f"per forward\n{text!r}")  # fmt: skip

    slider = widgets.SelectionSlider(options=list(temperatures), value=value,
                                     description="temperature")  # fmt: skip
    explorer(draw, {"temperature": slider})
