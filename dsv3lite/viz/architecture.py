"""DeepSeek-V3's architecture drawn for the course (notebook 00), with the primitives of
``dsv3lite.viz.diagram`` (boxes centred on their position, arrows, the residual's "+").

The picture has three levels, left to right: the whole model (embedding, L Transformer blocks,
final norm, output head, and the MTP module beside it), one block (two pre-norm residual
sub-layers: Multi-head Latent Attention, then DeepSeekMoE), and the MoE layer (a router choosing
K_r of N_r routed experts per token, plus N_s shared experts every token goes through). The
numbers on it come from a ``ModelConfig``, so the same drawing labels the 671B model or ``tiny``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..config import ModelConfig, preset
from .diagram import FILL, FONT, arrow, box, canvas, path, plus
from .style import COLORS, DPI


def architecture_figure(config: ModelConfig | None = None, *, show_mtp: bool = True) -> Figure:
    """DeepSeek-V3 in three levels: the model, one Transformer block, and DeepSeekMoE.

    ``config`` (the ``v3-671b`` preset by default) supplies the labels: L layers (of which the
    first ``first_k_dense_replace`` use a dense FFN instead of MoE), N_r routed experts of which
    K_r are chosen per token in at most ``topk_group`` of ``n_group`` groups, N_s shared experts,
    the MLA widths. ``show_mtp`` adds the Multi-Token Prediction module beside the stack: it
    shares the embedding and the output head. Returns the Figure (not shown: display it, or
    let the notebook's last expression show it).
    """
    c = config if config is not None else preset("v3-671b")
    L, k_dense = c.num_hidden_layers, c.first_k_dense_replace
    n_r, k_r, n_s = c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts
    fig, ax = canvas(12.5, 7.0, (0, 23.5), (-1.0, 12.4))

    # ---- level 1: the model, tokens at the bottom, logits at the top
    x0 = 2.6
    box(ax, x0, 0.8, 3.6, 0.8, "input tokens", FILL["io"])
    box(ax, x0, 2.2, 3.6, 0.9, f"embedding\n{c.vocab_size:,} × {c.hidden_size:,}", FILL["norm"])
    for k in (2, 1):  # the stack's shadow: L blocks behind the one drawn
        box(ax, x0 + 0.16 * k, 5.0 + 0.16 * k, 3.6, 3.0, "", "#F3F3F3", edge="#999999")
    box(ax, x0, 5.0, 3.6, 3.0, "", "#FFFFFF", edge="#333333", lw=1.6)
    ax.text(x0, 5.45, "Transformer\nblock", ha="center", va="center", fontsize=11, weight="bold")
    ax.text(x0, 4.3, f"× L = {L}", ha="center", va="center", fontsize=FONT)
    ax.text(x0, 3.75, f"(first {k_dense} dense FFN)", ha="center", va="center", fontsize=9)
    box(ax, x0, 7.6, 3.6, 0.8, "RMSNorm", FILL["norm"])
    box(ax, x0, 9.0, 3.6, 0.9, f"output head\n{c.hidden_size:,} → {c.vocab_size:,}", FILL["norm"])
    box(ax, x0, 10.5, 3.6, 0.8, "next-token logits", FILL["io"])
    for y0, y1 in [(1.2, 1.75), (2.65, 3.5), (6.5, 7.2), (8.0, 8.55), (9.45, 10.1)]:
        arrow(ax, (x0, y0), (x0, y1))
    ax.text(x0, 11.7, "the model", ha="center", fontsize=12, weight="bold")
    if show_mtp:
        ax.text(
            0.8,
            -0.55,
            f"+ {c.num_nextn_predict_layers} MTP module (not drawn): one "
            "more block that predicts the token after next, sharing the embedding and "
            "the output head (notebook 03)",
            ha="left",
            va="center",
            fontsize=9,
            color="#555555",
        )

    # ---- level 2: one block, two pre-norm residual sub-layers
    x1 = 9.2
    box(ax, x1, 0.8, 3.0, 0.8, r"$h^{\ell-1}_t$", FILL["io"])
    box(ax, x1, 2.3, 3.0, 0.8, "RMSNorm", FILL["norm"])
    box(
        ax,
        x1,
        3.8,
        3.0,
        1.3,
        f"Multi-head Latent\nAttention (MLA)\n{c.num_attention_heads} "
        f"heads, d_c = {c.kv_lora_rank}",
        FILL["attention"],
        size=9.5,
    )
    add1 = (x1, 5.3)
    box(ax, x1, 6.7, 3.0, 0.8, "RMSNorm", FILL["norm"])
    box(ax, x1, 8.2, 3.0, 1.0, "DeepSeekMoE", FILL["moe"], weight="bold")
    add2 = (x1, 9.7)
    box(ax, x1, 11.0, 3.0, 0.8, r"$h^{\ell}_t$", FILL["io"])
    for y in (add1[1], add2[1]):
        plus(ax, x1, y)
    for y0, y1 in [
        (1.2, 1.9),
        (2.7, 3.15),
        (4.45, 5.0),
        (5.6, 6.3),
        (7.1, 7.7),
        (8.7, 9.4),
        (10.0, 10.6),
    ]:
        arrow(ax, (x1, y0), (x1, y1))
    # residual paths around each sub-layer
    for y_from, add in [(1.55, add1), (5.95, add2)]:
        path(ax, [(x1, y_from), (x1 - 2.1, y_from), (x1 - 2.1, add[1]), (add[0] - 0.3, add[1])])
    ax.text(
        x1 - 2.25,
        3.5,
        "residual",
        rotation=90,
        ha="right",
        va="center",
        fontsize=9,
        color="#555555",
    )
    ax.text(x1, 11.7, "one block", ha="center", fontsize=12, weight="bold")
    # zoom lines: the stack's block is the block drawn in detail
    for ya, yb in [(6.5, 11.4), (3.5, 0.4)]:
        ax.plot([x0 + 1.8, x1 - 2.4], [ya, yb], color="#AAAAAA", lw=0.9, ls="--")

    # ---- level 3: DeepSeekMoE
    x2 = 18.2
    box(ax, 18.4, 5.8, 9.6, 11.0, fill="#FFF8EC", edge=COLORS[1], lw=1.4)  # the MoE's frame
    ax.plot([x1 + 1.5, 13.6], [8.2, 11.3], color="#AAAAAA", lw=0.9, ls="--")
    ax.plot([x1 + 1.5, 13.6], [8.2, 0.3], color="#AAAAAA", lw=0.9, ls="--")
    ax.text(x2 + 0.2, 11.7, "DeepSeekMoE", ha="center", fontsize=12, weight="bold")
    box(ax, x2, 1.1, 3.4, 0.8, r"$u_t$ (normed input)", FILL["io"])
    box(
        ax,
        20.6,
        3.0,
        4.4,
        1.3,
        f"router: sigmoid affinity + bias\ntop-K_r = {k_r} of "
        f"{n_r}\n(≤ {c.topk_group} of {c.n_group} groups)",
        "#FFFFFF",
        size=9,
    )
    # routed experts: a row of small boxes, the chosen ones filled
    n_draw = 8
    chosen = {1, 4, 6}
    xs = [16.3 + 0.76 * i for i in range(n_draw)]
    for i, xe in enumerate(xs):
        fill = COLORS[1] if i in chosen else "#FFFFFF"
        box(ax, xe, 6.0, 0.62, 0.9, "", fill, lw=1.0)
    ax.text(xs[-1] + 0.4, 6.0, "…", ha="left", va="center", fontsize=12)
    ax.text(
        19.1,
        7.0,
        f"N_r = {n_r} routed experts ({c.moe_intermediate_size:,} wide);"
        f"\nthe K_r = {k_r} chosen (filled) get weights g",
        ha="center",
        va="bottom",
        fontsize=9,
    )
    box(
        ax,
        14.75,
        5.0,
        1.7,
        2.6,
        f"N_s = {n_s}\nshared\nexpert{'s' if n_s != 1 else ''}\n(always)",
        FILL["shared"],
        size=9.5,
    )
    box(
        ax,
        x2,
        9.0,
        5.6,
        0.9,
        r"$\sum_{s}\mathrm{FFN}^{(s)}_s(u_t)"
        r"+ \sum_{i} g_{i}\,\mathrm{FFN}^{(r)}_i(u_t)$",
        "#FFFFFF",
        size=10,
    )
    arrow(ax, (x2 - 0.6, 1.5), (14.75, 3.65))
    arrow(ax, (x2 + 0.4, 1.5), (20.6, 2.35))
    for i in chosen:
        arrow(ax, (20.0, 3.65), (xs[i], 5.55), color=COLORS[3])
    ax.text(20.55, 4.55, "top-K_r", fontsize=9, color=COLORS[3], ha="left")
    arrow(ax, (14.75, 6.35), (15.9, 8.55), color=COLORS[2])
    for i in chosen:
        arrow(ax, (xs[i], 6.45), (x2 - 0.6 + 0.4 * sorted(chosen).index(i), 8.6), color=COLORS[1])
    arrow(ax, (x2, 9.4), (x2, 10.5))
    ax.text(x2, 10.75, "to the residual add", ha="center", fontsize=9, color="#555555")
    plt.close(fig)  # closed: the cell returning it shows it once
    return fig


def parameter_share_figure(counts, parts: list[str]) -> Figure:
    """Where the parameters are, from ``dsv3lite.accounting.count_parameters``: left, each
    part's total and per-token (activated) count on a log scale, since the parts span six
    orders of magnitude; right, the same as shares of the sum, total against activated, so a
    part that is most of the weights but little of the work stands out."""
    names = [p for p in parts if counts.total[p]]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
    y = list(range(len(names)))
    ax0.barh(
        [v - 0.2 for v in y], [counts.total[p] / 1e9 for p in names], height=0.4, label="total"
    )
    ax0.barh(
        [v + 0.2 for v in y],
        [counts.activated[p] / 1e9 for p in names],
        height=0.4,
        label="activated per token",
    )
    ax0.set(yticks=y, yticklabels=names, xscale="log", xlabel="parameters (B, log scale)")
    ax0.invert_yaxis()
    ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax0.set_title("DeepSeek-V3 by part")
    left_t = left_a = 0.0
    for i, p in enumerate(names):
        t = 100 * counts.total[p] / counts.total_sum
        a = 100 * counts.activated[p] / counts.activated_sum
        ax1.barh(
            ["activated", "total"],
            [a, t],
            left=[left_a, left_t],
            label=p,
            color=COLORS[i % len(COLORS)],
        )
        left_t, left_a = left_t + t, left_a + a
    ax1.set(xlim=(0, 100), xlabel="share of the sum (%)")
    ax1.set_title("shares: total vs what one token touches")
    ax1.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    plt.close(fig)  # closed: the cell returning it shows it once
    return fig
