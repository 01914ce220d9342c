"""Pictures of notebook 01 (Multi-head Latent Attention): the compression diagram, and the plots
whose plumbing would otherwise fill the notebook's cells.

* ``mla_figure``: eqs. 1–11 as a data flow, the cached tensors highlighted, the cache per token
  labelled from a ``ModelConfig``;
* ``cache_size_figure``: the KV cache of one sequence against the context, per design;
* ``rope_folding_figure``: why W^UK folds into the query only when RoPE is decoupled;
* ``absorbed_costs`` / ``cost_figure`` / ``cost_explorer``: bytes, FLOPs and arithmetic
  intensity of the absorbed decode step as the latent width and the head count change;
* ``roofline_figure``: where that step sits against a GPU's two ceilings (``Roofline``, the
  arithmetic, is ``dsv3lite.accounting``'s; the line is drawn by ``viz.roofline``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..accounting import Roofline, absorbed_decode_cost, kv_cache_bytes
from ..config import ModelConfig, preset
from .diagram import FILL, arrow, box, canvas
from .roofline import roofline
from .style import COLORS, DPI, legend_outside
from .widgets import explorer


def cache_numbers(config: ModelConfig) -> tuple[int, int]:
    """(MLA, MHA) numbers kept per token per layer: d_c + d_h^R for MLA, n_h · (d_h + d_h^R
    + d_h^V) for MHA with the same heads (keys as wide as MLA's, RoPE part included). Read
    from ``dsv3lite.accounting.kv_cache_bytes``, so the picture and the package agree."""
    cb = kv_cache_bytes(config, bytes_per_value=1)
    return cb.mla, cb.mha


def mla_figure(config: ModelConfig | None = None, bytes_per_value: int = 2) -> Figure:
    """MLA's low-rank joint KV compression and the decoupled RoPE key (report §2.1.1, eqs. 1–11).

    Bottom to top: h_t is compressed to the latent c^KV_t (W^DKV), from which every head's key
    k^C and value v^C are rebuilt (W^UK, W^UV); the RoPE key k^R_t = RoPE(W^KR h_t) is one
    small vector shared by all heads. Only c^KV_t and k^R_t (highlighted) are cached. The
    queries go through their own latent c^Q_t. The caption gives the cache per token per layer
    for ``config`` (``v3-671b`` by default) against MHA with the same heads, in numbers and in
    bytes at ``bytes_per_value`` (2: bf16).
    """
    c = config if config is not None else preset("v3-671b")
    mla, mha = cache_numbers(c)
    H, d_c, d_r = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    fig, ax = canvas(11.0, 6.9, (0, 20), (-1.6, 11.0))
    cache, q_fill = FILL["cache"], FILL["attention"]

    box(ax, 10, 0.6, 17.5, 0.8, rf"hidden state $h_t$  ({c.hidden_size:,})", FILL["io"])
    # queries (left): their own latent, then content and RoPE parts per head
    box(ax, 4.0, 3.2, 3.0, 0.9, rf"$c^Q_t$  ({c.q_lora_rank:,})", q_fill)
    box(ax, 2.2, 5.9, 3.0, 0.9, rf"$q^C_{{t,i}}$  ({H} × {c.qk_nope_head_dim})", q_fill)
    box(ax, 5.8, 5.9, 3.0, 0.9, rf"$q^R_{{t,i}}$  ({H} × {d_r})", q_fill)
    arrow(ax, (4.0, 1.0), (4.0, 2.75), r"$W^{DQ}$")
    arrow(ax, (3.6, 3.65), (2.4, 5.45), r"$W^{UQ}$", offset=(-0.2, 0), ha="right")
    arrow(ax, (4.4, 3.65), (5.6, 5.45), r"RoPE($W^{QR}\cdot$)", offset=(0.2, 0))
    # keys and values (right): the cached latent and the shared RoPE key
    box(
        ax,
        11.0,
        3.2,
        3.4,
        0.9,
        rf"$c^{{KV}}_t$  ({d_c})",
        cache,
        edge=COLORS[3],
        lw=2.2,
        weight="bold",
    )
    box(
        ax,
        17.0,
        3.2,
        3.2,
        0.9,
        rf"$k^R_t$  ({d_r}, all heads)",
        cache,
        edge=COLORS[3],
        lw=2.2,
        weight="bold",
    )
    box(ax, 9.4, 5.9, 3.0, 0.9, rf"$k^C_{{t,i}}$  ({H} × {c.qk_nope_head_dim})", "#FFFFFF")
    box(ax, 13.0, 5.9, 3.0, 0.9, rf"$v^C_{{t,i}}$  ({H} × {c.v_head_dim})", "#FFFFFF")
    arrow(ax, (11.0, 1.0), (11.0, 2.75), r"$W^{DKV}$")
    arrow(ax, (17.0, 1.0), (17.0, 2.75), r"RoPE($W^{KR}\cdot$)")
    arrow(ax, (10.6, 3.65), (9.6, 5.45), r"$W^{UK}$", offset=(-0.2, 0), ha="right")
    arrow(ax, (11.4, 3.65), (12.8, 5.45), r"$W^{UV}$", offset=(0.2, 0))
    # the cache: a dashed frame around what is kept
    box(ax, 14.0, 3.2, 10.6, 1.6, "", "none", edge=COLORS[3], dashed=True)
    ax.text(14.0, 2.1, "KV cache: only these are kept", ha="center", fontsize=9.5, color=COLORS[3])
    # attention on top
    box(ax, 10, 8.6, 17.5, 1.3, "", "#F7F7F7")
    ax.text(
        10,
        8.85,
        r"attention, head $i$:  $q_{t,i} = [q^C_{t,i};\, q^R_{t,i}]$,  "
        r"$k_{j,i} = [k^C_{j,i};\, k^R_j]$,  softmax over $j \leq t$,  values $v^C_{j,i}$",
        ha="center",
        va="center",
        fontsize=10,
    )
    ax.text(
        10,
        8.25,
        rf"$u_t = W^O\,[o_{{t,1}}; \dots; o_{{t,{H}}}]$",
        ha="center",
        va="center",
        fontsize=10,
    )
    for x in (2.2, 5.8, 9.4, 13.0):
        arrow(ax, (x, 6.35), (x, 7.9))
    arrow(ax, (17.0, 3.65), (17.0, 7.9), r"(copied to every head)", offset=(0.12, 1.0))

    ratio = mla / mha
    ax.text(
        10,
        10.3,
        rf"MLA, {H} heads: $d_c$ = {d_c}, $d_h^R$ = {d_r}",
        ha="center",
        fontsize=11,
        weight="bold",
    )
    ax.text(
        0.2,
        -0.5,
        rf"cached per token per layer — MLA: $d_c + d_h^R$ = {d_c} + {d_r} = "
        f"{mla:,} numbers ({mla * bytes_per_value:,} B at {bytes_per_value} B a number)",
        ha="left",
        va="center",
        fontsize=10,
        color=COLORS[3],
        gid="cache_mla",
    )
    ax.text(
        0.2,
        -1.2,
        r"MHA with the same heads: $n_h (d_h + d_h^R + d_h^V)$ = "
        f"{H}·"
        f"{c.qk_head_dim + c.v_head_dim} = {mha:,} numbers ({mha * bytes_per_value:,} B); "
        f"MLA keeps {ratio:.2%} of it",
        ha="left",
        va="center",
        fontsize=10,
        gid="cache_mha",
    )
    plt.close(fig)  # closed: the cell returning it shows it once
    return fig


# ---------------------------------------------------------------------------- the cache table
UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}


def cache_size_figure(setups: Sequence[tuple], cache_values: Callable[[ModelConfig, str], int]):
    """One panel per setup (title, config, bytes per number, designs, contexts, unit): the
    KV cache of one sequence over all layers against the context, per design, on log-log axes
    (the designs differ by orders of magnitude). ``cache_values(config, design)`` is the
    notebook's own formula, so the plot shows what the learner's table printed."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=DPI)
    for ax, (title, c, nbytes, designs, _, unit) in zip(axes, setups, strict=True):
        big = c.num_hidden_layers > 8
        contexts = [2**k for k in range(7, 18)] if big else [2**k for k in range(4, 10)]
        for d in designs:
            per_token = cache_values(c, d) * nbytes * c.num_hidden_layers
            ax.plot(contexts, [per_token * n / UNITS[unit] for n in contexts], marker=".", label=d)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel=f"KV cache ({unit})")
        ax.set_xticks(contexts[::2], [f"{n:,}" for n in contexts[::2]])
        ax.minorticks_off()
        ax.set_title(f"one sequence, {title}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(designs))
    plt.close(fig)  # closed: the cell returning it shows it once
    return fig


# ---------------------------------------------------------------------------- RoPE and folding
def rope_folding_figure(exact_a, folded_a, exact_b, folded_b, t: int):
    """Scores of one query against every cached key, exact and with W^UK folded into the query:
    (a) RoPE on the whole key, where folding is right only at distance 0; (b) MLA's decoupled
    RoPE, where the two curves coincide."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3), dpi=DPI, sharey=True)
    j = range(len(exact_a))
    for ax, exact, folded, title, what in [
        (
            axes[0],
            exact_a,
            folded_a,
            "(a) RoPE on the whole key: folding breaks",
            "exact: RoPE on the whole key",
        ),
        (
            axes[1],
            exact_b,
            folded_b,
            "(b) decoupled RoPE: folding is exact",
            "exact: decoupled k^R",
        ),
    ]:
        ax.plot(j, exact, label=what, color=COLORS[0])
        ax.plot(j, folded, "--", label="W^UK folded into the query", color=COLORS[1])
        ax.set(xlabel=f"key position j (query at t = {t})", title=title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1)
    axes[0].set_ylabel("score q·k")
    plt.close(fig)  # closed: the cell returning it shows it once
    return fig


# ---------------------------------------------------------------------------- absorbed decode
def absorbed_costs(kv_lora_rank: int, n_heads: int, rope: int = 64, bytes_per_value: int = 2):
    """Per cached token per decode step of the absorbed path: (bytes read, FLOPs per head,
    FLOP per byte). The bytes are the latent and the RoPE key, read once for all heads; each
    head does 2·(d_c + d_h^R) FLOPs for its score and 2·d_c for the value average: the
    package's ``accounting.absorbed_decode_cost`` for one head and one cached token."""
    nbytes, flops = absorbed_decode_cost(kv_lora_rank, rope, 1, 1, 1, 1, bytes_per_value)
    return nbytes, flops, n_heads * flops / nbytes


def cost_figure(
    kv_lora_rank: int,
    n_heads: int,
    roof: Roofline,
    layers: int = 61,
    rope: int = 64,
    ranks: Sequence[int] = range(64, 2049, 32),
) -> Figure:
    """Two panels for one (d_c, n_h): the cache per token over all layers, and the absorbed
    step's FLOP per byte against the roofline's ridge, both as d_c sweeps ``ranks``; the
    chosen d_c is the dot. Closed, not shown: pass it to a display handle."""
    nbytes, flops, intensity = absorbed_costs(kv_lora_rank, n_heads, rope)
    ranks = list(ranks)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.3), dpi=DPI)
    ax0.plot(ranks, [absorbed_costs(r, n_heads, rope)[0] * layers / 1024 for r in ranks])
    ax0.plot([kv_lora_rank], [nbytes * layers / 1024], "o", color=COLORS[3])
    ax0.set(xlabel="kv_lora_rank d_c", ylabel=f"KiB per token ({layers} layers, bf16)")
    ax0.set_title(f"cache: {nbytes:,} B/token/layer; {flops:,} FLOPs/token/head")
    ax1.plot(ranks, [absorbed_costs(r, n_heads, rope)[2] for r in ranks], label=f"{n_heads} heads")
    ax1.plot([kv_lora_rank], [intensity], "o", color=COLORS[3], label=f"d_c = {kv_lora_rank}")
    ax1.axhline(roof.ridge, color="gray", ls="--", lw=1, label=f"ridge {roof.ridge:.0f}")
    ax1.set(xlabel="kv_lora_rank d_c", ylabel="FLOP per byte", ylim=(0, 2.1 * max(n_heads, 100)))
    bound = "compute-bound" if intensity > roof.ridge else "memory-bound"
    ax1.set_title(f"intensity {intensity:.0f} FLOP/byte: {bound}")
    legend_outside(ax1)
    plt.close(fig)  # shown through a display handle, not by the inline backend
    return fig


def cost_explorer(roof: Roofline, layers: int = 61, rope: int = 64) -> None:
    """Sliders for d_c and n_h over ``cost_figure``, redrawn on release. Displays the
    controls and, under them, the figure for the defaults (the release's d_c = 512, 128
    heads): that figure is what a saved notebook keeps, where no kernel redraws it."""
    import ipywidgets as widgets

    controls = {
        "kv_lora_rank": widgets.IntSlider(
            value=512, min=64, max=2048, step=32, description="kv_lora_rank"
        ),
        "heads": widgets.SelectionSlider(options=[16, 32, 64, 128], value=128, description="heads"),
    }
    explorer(lambda kv_lora_rank, heads: cost_figure(kv_lora_rank, heads, roof, layers, rope),
             controls)  # fmt: skip


def roofline_figure(
    roof: Roofline,
    kv_lora_rank: int = 512,
    rope: int = 64,
    heads: Sequence[int] = (16, 32, 64, 128),
) -> Figure:
    """Left: the roofline with the absorbed step at each head count and the naive step (1 FLOP
    per byte in bf16, whatever the heads). Right: the absorbed step's intensity against n_h,
    the ridge splitting memory-bound from compute-bound."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10.5, 3.4), dpi=DPI)
    roofline(ax0, roof, (0.5, 1000.0), labels=False)
    for n_h in heads:
        i = absorbed_costs(kv_lora_rank, n_h, rope)[2]
        ax0.plot([i], [roof.attainable(i) / 1e12], "o", label=f"absorbed, {n_h} heads")
    ax0.plot([1.0], [roof.attainable(1.0) / 1e12], "s", color="gray", label="naive, any heads")
    ax0.set_title(f"{roof.name} roofline, one MLA decode step")
    legend_outside(ax0)
    hs = list(range(16, 129, 8))
    ax1.plot(
        hs,
        [absorbed_costs(kv_lora_rank, n, rope)[2] for n in hs],
        marker=".",
        label=f"absorbed, d_c = {kv_lora_rank}",
    )
    ax1.axhline(roof.ridge, color="gray", ls="--", lw=1, label=f"ridge {roof.ridge:.0f}")
    ax1.fill_between(hs, 0, roof.ridge, color=COLORS[0], alpha=0.08)
    ax1.text(92, roof.ridge * 0.35, "memory-bound", fontsize=9)  # below the curve
    ax1.text(20, roof.ridge * 1.15, "compute-bound", fontsize=9)
    ax1.set(xlabel="query heads n_h", ylabel="FLOP per byte", xticks=[16, 32, 64, 96, 128])
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    plt.close(fig)  # closed: the cell returning it shows it once
    return fig
