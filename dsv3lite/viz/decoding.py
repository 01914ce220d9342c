"""Pictures of decoding (notebooks 09 and 10): MTP speculation as a diagram, the sampling
distribution, the MLA decode kernel on its roofline, and speculation's acceptance.

The notebooks keep the idea in their cells (the decode loop, the draft and its check); the
drawing lives here so that a cell stays a few lines long. Every function returns (or shows) a
matplotlib figure in the course's style: ≥ 100 dpi, text ≥ 9 pt, legends off the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from ..accounting import Roofline, absorbed_decode_cost
from .diagram import GREY, arrow, box, canvas
from .roofline import roofline
from .style import COLORS, legend_outside
from .widgets import explorer

MAIN, MTP, ACCEPT, REJECT, CONTEXT = COLORS[0], COLORS[1], COLORS[2], COLORS[3], "#DDDDDD"
LATENT, ROPE = 512, 64  # d_c and d_h^R of the release: what a cached token holds
LABEL_ABOVE = dict(offset=(0.0, 0.3), ha="center", size=9)  # an arrow's label over its middle


def speculation_figure() -> Figure:
    """One step of MTP self-speculative decoding (report §5.4.3), drawn for this course.

    Top, step k: the main model's forward gives token t_{i+1} and its hidden state h_i; the MTP
    module turns (h_i, Emb(t_{i+1})) into a draft d for t_{i+2} — a guess, drawn dashed.
    Bottom, step k+1: one main forward over the two tokens [t_{i+1}, d] verifies the draft and
    yields the token after it. If the main model's own choice at d's slot is d, both tokens
    stand (two new tokens for one main forward); if not, its choice replaces d (one token) and
    d's slot in the cache is forgotten. Either way the output is what the main model alone
    would have written: speculation changes the cost, not the text.
    """
    fig, ax = canvas(10.5, 5.4, (0, 10.5), (0, 6.1), equal=False)
    ax.text(0.1, 5.8, "step k: the main model picks the next token, the MTP module drafts "
            "the one after", fontsize=11, weight="bold")  # fmt: skip
    box(ax, 0.95, 4.06, 1.5, 0.62, r"$\ldots\ t_{i-1}\ t_i$", CONTEXT, edge=CONTEXT, lw=1.6)
    box(ax, 3.3, 4.05, 2.0, 1.0, "main model\n(cache of ≤ i)", 0.18, edge=MAIN, lw=1.6)
    arrow(ax, (1.75, 4.06), (2.25, 4.06), lw=1.4)
    box(ax, 5.525, 4.91, 1.15, 0.62, r"$t_{i+1}$", 0.45, edge=MAIN, lw=1.6)
    arrow(ax, (4.35, 4.3), (4.9, 4.85), color=MAIN, lw=1.4)
    ax.text(4.2, 4.75, "argmax", ha="right", fontsize=9, color=MAIN)
    box(ax, 7.75, 4.05, 2.0, 1.0, "MTP module\n" + r"$(h_i,\ \mathrm{Emb}(t_{i+1}))$", 0.18,
        edge=MTP, lw=1.6)  # fmt: skip
    arrow(ax, (4.35, 3.8), (6.7, 3.8), r"$h_i$", color=MAIN, lw=1.4, **LABEL_ABOVE)
    arrow(ax, (6.15, 4.9), (6.9, 4.6), color=MAIN, lw=1.4)
    box(ax, 9.775, 4.06, 1.15, 0.62, r"draft $d$", 0.18, edge=MTP, dashed=True, lw=1.6)
    arrow(ax, (8.8, 4.06), (9.15, 4.06), color=MTP, lw=1.4)

    ax.plot([0.1, 10.4], [3.2, 3.2], color=GREY, lw=0.8, ls=":")
    ax.text(0.1, 2.85, "step k+1: one main forward over two tokens verifies the draft",
            fontsize=11, weight="bold")  # fmt: skip
    box(ax, 0.775, 1.66, 1.15, 0.62, r"$t_{i+1}$", 0.45, edge=MAIN, lw=1.6)
    box(ax, 0.775, 0.7, 1.15, 0.9, "draft $d$\n(step k)", 0.18, edge=MTP, dashed=True, lw=1.6)
    box(ax, 3.3, 1.2, 2.0, 1.3, "main model\n2 positions,\none forward", 0.18, edge=MAIN, lw=1.6)
    arrow(ax, (1.4, 1.66), (2.25, 1.5), lw=1.4)
    arrow(ax, (1.4, 0.76), (2.25, 0.9), lw=1.4)
    box(ax, 5.7, 1.31, 1.6, 0.62, r"its choice $= d$ ?", 0.08, edge="#666666", lw=1.6)
    arrow(ax, (4.35, 1.2), (4.85, 1.3), lw=1.4)
    box(ax, 8.7, 2.0, 3.2, 0.9, "accept: keep $d$ and the next token\n"
        "→ 2 new tokens this step", 0.18, edge=ACCEPT, lw=1.6)  # fmt: skip
    box(ax, 8.7, 0.65, 3.2, 0.9, "reject: its own choice replaces $d$\n"
        "→ 1 new token; $d$'s slot dropped", 0.18, edge=REJECT, lw=1.6)  # fmt: skip
    arrow(ax, (6.55, 1.5), (7.05, 1.95), "yes", color=ACCEPT, lw=1.4, **LABEL_ABOVE)
    arrow(ax, (6.55, 1.1), (7.05, 0.7), color=REJECT, lw=1.4)
    ax.text(6.7, 0.62, "no", fontsize=9, color=REJECT)
    return fig


def nucleus_figure(logits: torch.Tensor, temperatures: Sequence[float], top_p: float,
                   title: str) -> Figure:  # fmt: skip
    """The next-token distribution ranked by probability at several temperatures, on log–log
    axes, with a dot where the top-p nucleus ends: temperature reshapes the whole curve, top-p
    only cuts its tail, and a flatter curve needs more tokens to reach the same mass."""
    from ..generate import probabilities, top_p_mask

    fig, ax = plt.subplots(figsize=(7.5, 3.3))
    for temperature in temperatures:
        p = probabilities(logits, temperature)
        kept = int(top_p_mask(p, top_p).sum())
        ranked = p.sort(descending=True).values
        ranks = range(1, len(ranked) + 1)
        (line,) = ax.loglog(ranks, ranked, label=f"T = {temperature}: {kept} tokens in the nucleus")
        ax.plot([kept], [ranked[kept - 1]], "o", color=line.get_color())
    ax.set(xlabel="token rank", ylabel="probability", title=title)
    legend_outside(ax)
    return fig


def intensity(heads: int, tokens: int = 1) -> float:
    """FLOP per byte of one absorbed decode step at the release's widths (bf16), independent of
    batch and context (``dsv3lite.accounting.absorbed_decode_cost``)."""
    nbytes, flops = absorbed_decode_cost(LATENT, ROPE, heads, 1, 1, tokens)
    return flops / nbytes


def parse_shape(shape: str) -> dict[str, int]:
    """A benchmark row's shape, "H16 B64 L4096" → {"H": 16, "B": 64, "L": 4096}."""
    return {part[0]: int(part[1:]) for part in shape.split()}


def mla_bench_figure(bench: dict, targets: dict[int, float]) -> Figure:
    """The recorded MLA decode runs (``dsv3lite.results.load("mla")``): left, every row on the
    roofline of the ceilings measured in the same run (filled: ours, open: eager torch);
    right, each shape as a fraction of the ceiling that binds it — the copy rate at 16 heads,
    the GEMM rate at 128 — with ``targets`` ({heads: fraction}) dashed at the two
    large-batch shapes."""
    copy_gbs, gemm = bench["ceilings"]["copy_gbs"], bench["ceilings"]["gemm_tflops"]
    rows = bench["rows"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    markers = dict(zip(shapes, "osD^" * 2))
    fig, (ax, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=[1, 1.15])
    roofline(ax, Roofline(gemm * 1e12, copy_gbs * 1e9), ylim=(1, 2000))
    for r in rows:
        ours = r["impl"] == "ours triton"
        x = intensity(parse_shape(r["shape"])["H"]) * (1.06 if ours else 0.94)
        ax.plot(x, r["tflops"], markers[r["shape"]], mfc=MAIN if ours else "none",
                mec=MAIN if ours else MTP, ms=6)  # fmt: skip
    for h in (16, 128):
        ax.annotate(f"H = {h}", (intensity(h), 3), ha="center", fontsize=9)
    ax.plot([], [], "o", color=MAIN, label="ours (Triton)")
    ax.plot([], [], "o", mfc="none", mec=MTP, label="eager torch")
    for shape in shapes[:4]:
        ax.plot([], [], markers[shape], color="gray", label=shape.split(" ", 1)[1])
    ax.set_title("MLA decode step on the H200")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.5), ncol=3)
    xs = torch.arange(len(shapes))
    for k, impl in enumerate(("ours triton", "eager torch")):
        share = [next(r["of_copy"] if parse_shape(s)["H"] == 16 else r["of_gemm"]
                      for r in rows if r["shape"] == s and r["impl"] == impl) for s in shapes]  # fmt: skip
        ax_bar.bar(xs + (k - 0.5) * 0.4, share, 0.4, color=(MAIN, MTP)[k], label=impl)
    large = [k for k, s in enumerate(shapes) if parse_shape(s)["B"] >= 64]
    for n, k in enumerate(large):
        ax_bar.hlines(targets[parse_shape(shapes[k])["H"]], k - 0.45, k + 0.45, colors=REJECT,
                      ls="--", label="target" if n == 0 else None)  # fmt: skip
    ax_bar.set_xticks(xs, [s.replace(" ", "\n") for s in shapes], fontsize=9)
    ax_bar.set(ylim=(0, 1), ylabel="fraction of the binding ceiling",
               title="H = 16: of the copy rate  |  H = 128: of the GEMM rate")  # fmt: skip
    legend_outside(ax_bar)
    return fig


def step_costs(heads: int, tokens: int, context: int, batch: int, copy_gbs: float,
               gemm_tflops: float) -> dict:  # fmt: skip
    """Bytes, FLOPs and the roofline's lower bound on the time of one layer's absorbed decode
    step: max(bytes / copy rate, FLOPs / GEMM rate), and which of the two binds."""
    nbytes, flops = absorbed_decode_cost(LATENT, ROPE, heads, context, batch, tokens)
    roof = Roofline(gemm_tflops * 1e12, copy_gbs * 1e9)
    bound = "memory-bound" if flops / nbytes < roof.ridge else "compute-bound"
    return dict(nbytes=nbytes, flops=flops, intensity=flops / nbytes,
                seconds=roof.seconds(nbytes, flops), bound=bound)  # fmt: skip


def explore_figure(heads, tokens, context, batch, copy_gbs, gemm_tflops) -> tuple[Figure, str]:
    """One view of the explorer: the step's point on the roofline and a line of its costs."""
    c = step_costs(heads, tokens, context, batch, copy_gbs, gemm_tflops)
    roof = Roofline(gemm_tflops * 1e12, copy_gbs * 1e9)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    roofline(ax, roof, ylim=(1, 2000))
    ax.plot([c["intensity"]], [roof.attainable(c["intensity"]) / 1e12], "o", color=REJECT, ms=9)
    ax.set_title(f"H = {heads}, T = {tokens}: {c['intensity']:.0f} FLOP/byte, {c['bound']}")
    plt.close(fig)
    text = (
        f"B = {batch}, L = {context:,}: reads {c['nbytes'] / 2**20:,.1f} MiB of cache, "
        f"{c['flops'] / 1e9:,.1f} GFLOP -> at least {c['seconds'] * 1e6:,.1f} µs "
        f"({c['flops'] / c['seconds'] / 1e12:.0f} TFLOP/s, "
        f"{c['nbytes'] / c['seconds'] / 1e9:,.0f} GB/s)"
    )
    return fig, text


def roofline_explorer(copy_gbs: float, gemm_tflops: float, **initial: int) -> None:
    """Controls for heads, query tokens, context and batch over ``explore_figure``, through
    ``widgets.explorer``: the view at ``initial`` is drawn into the output at once, so the saved
    notebook shows it (a widget does not render on a static page); sliders redraw on release."""
    import ipywidgets as widgets
    from IPython.display import Pretty

    values = dict(heads=128, tokens=1, context=4096, batch=64) | initial
    controls = {
        "heads": widgets.SelectionSlider(
            options=[8, 16, 32, 64, 128], value=values["heads"], description="heads H"
        ),
        "tokens": widgets.ToggleButtons(options=[1, 2], value=values["tokens"], description="T"),
        "context": widgets.SelectionSlider(
            options=[2**k for k in range(10, 18)], value=values["context"], description="context L"
        ),
        "batch": widgets.SelectionSlider(
            options=[1, 4, 16, 64, 128], value=values["batch"], description="batch B"
        ),
    }

    def draw(**now):
        fig, text = explore_figure(**now, copy_gbs=copy_gbs, gemm_tflops=gemm_tflops)
        return fig, Pretty(text)

    explorer(draw, controls, per_row=1)


def acceptance_figure(rates: dict[str, Sequence[float]], prompts: Sequence[str],
                      lines: dict[str, float], report: tuple[float, float]) -> Figure:  # fmt: skip
    """Drafts accepted per prompt for each decoding rule (bars), beside reference levels
    (``lines``: name → rate, dashed) and the report's range (a grey band)."""
    fig, ax = plt.subplots(figsize=(8.5, 3.2))
    xs = torch.arange(len(prompts))
    width = 0.8 / len(rates)
    for k, (rule, values) in enumerate(rates.items()):
        ax.bar(xs + (k - (len(rates) - 1) / 2) * width, values, width, label=rule)
    ax.axhspan(*report, color="gray", alpha=0.25, label=f"report: {report[0]:.0%}–{report[1]:.0%}")
    for n, (name, value) in enumerate(lines.items()):
        ax.axhline(value, color=COLORS[7 - n], ls="--", label=f"{name} {value:.0%}")
    ax.set_xticks(xs, [repr(p) for p in prompts], fontsize=9)
    ax.set(ylim=(0, 1), ylabel="drafts accepted")
    legend_outside(ax)
    return fig


def speedup_figure(measured: dict[str, float], step_costs: Sequence[float] = (1.0, 1.3)) -> Figure:
    """Tokens per main forward, 1 + a, against the acceptance a, turned into a speed-up by the
    cost c of a speculative step relative to a plain one: (1 + a) / c; ``measured`` marks
    acceptances (name → a) on the c = 1 line."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    a = torch.linspace(0, 1, 101)
    for c in step_costs:
        ax.plot(a, (1 + a) / c, label=f"step cost c = {c:g}× a plain step")
    ax.axhline(1.5, color="gray", ls=":", lw=1)
    for n, (name, value) in enumerate(measured.items()):
        ax.plot(
            [value], [1 + value], "o", color=COLORS[3 + n], ms=8, label=f"{name}: a = {value:.0%}"
        )
    ax.set(xlabel="acceptance rate a", ylabel="speed-up (1 + a) / c", ylim=(0.7, 2.05))
    legend_outside(ax)
    return fig
