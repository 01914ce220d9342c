"""Pictures of notebook 02: DeepSeekMoE's routing, and the plots of its training runs.

``moe_figure`` draws the layer as the report's §2.1.2 defines it, for the configuration it is
given; the other functions draw what notebook 02 measures (a routing decision, collapse, three
balancing rules, the bias, the γ simulation) so that the notebook's cells keep only the idea.
The boxes and arrows are ``dsv3lite.viz.diagram``'s, the slider is ``dsv3lite.viz.widgets``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..config import ModelConfig, preset
from .diagram import BLUE, GREEN, GREY, ORANGE, PINK, RED, arrow, box, canvas, path, plus, tint
from .style import legend_outside
from .widgets import explorer


# ----------------------------------------------------------------------- the MoE layer
def moe_figure(config: ModelConfig | None = None) -> Figure:
    """DeepSeekMoE for one token u_t (report §2.1.2, eqs. 12–16), with the numbers of
    ``config`` (the ``tiny`` preset by default): the router's sigmoid affinities, the bias b_i
    that only steers the choice, group-limited top-K_r, the routed experts weighted by the
    normalised unbiased affinities g_i,t, and the shared experts every token uses, summed with
    the residual. The kept groups and chosen experts drawn are one example of a choice."""
    c = config or preset("tiny")
    n_r, n_g, k_g, k = c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok
    per_group = n_r // n_g
    fig, ax = canvas(13, 6.0, (0, 17.2), (0, 8.0), equal=False)

    box(ax, 0.75, 3.5, 1.3, 1.0, "token\n$u_t$", 0.15, edge=GREY, lw=1.6)
    box(ax, 3.5, 3.5, 3.0, 2.3, "router\n"
             r"$s_{i,t} = \sigma(u_t^{\top} e_i)$" "\n"
             r"choose by $s_{i,t} + b_i$" "\n"
             r"($b_i$: selection only)", 0.15, edge=PINK, lw=1.6)  # fmt: skip
    arrow(ax, (1.4, 3.5), (2.0, 3.5))

    kept, chosen = _example_choice(n_g, k_g, k, per_group)
    _draw_groups(ax, 5.6, 1.0, 5.0, 5.2, n_g, per_group, kept, chosen)
    ax.text(8.1, 6.3, f"group-limited top-$K_r$: {n_r} routed experts in n_group = {n_g}\n"
            f"groups, keep topk_group = {k_g} groups, choose $K_r$ = {k} experts",
            ha="center", va="bottom", fontsize=10)  # fmt: skip
    arrow(ax, (5.0, 3.5), (5.6, 3.5))

    shown = min(k, 4)
    for n in range(shown):
        label = "…" if k > 4 and n == shown - 1 else r"$g_{i,t}\,\mathrm{FFN}^{(r)}_i$"
        h = 3.4 / shown - 0.25
        box(ax, 12.35, 1.0 + n * 3.4 / shown + h / 2, 2.1, h, label, 0.15, edge=ORANGE, lw=1.6)
    scale = "" if c.routed_scaling_factor == 1 else f" × {c.routed_scaling_factor:g}"
    ax.text(12.35, 4.55, f"{k} routed experts, weights\n"
            r"$g_{i,t} = s_{i,t} / \sum_{j\ \mathrm{chosen}} s_{j,t}$" + scale,
            ha="center", va="bottom", fontsize=10)  # fmt: skip
    arrow(ax, (10.6, 2.7), (11.3, 2.7))

    n_s = c.n_shared_experts
    shared = f"{n_s} shared expert{'s' * (n_s != 1)}\nalways on"
    box(ax, 12.35, 7.2, 2.1, 1.0, shared, 0.15, edge=GREEN, lw=1.6)
    path(ax, [(0.75, 4.0), (0.75, 7.2), (11.3, 7.2)], GREEN)

    plus(ax, 14.6, 3.5, 0.38, size=16, lw=1.4)
    arrow(ax, (13.4, 2.7), (14.3, 3.28))
    path(ax, [(13.4, 7.2), (14.6, 7.2), (14.6, 3.88)], GREEN)
    path(ax, [(0.75, 3.0), (0.75, 0.35), (14.6, 0.35), (14.6, 3.12)], GREY)
    ax.text(7.5, 0.45, "residual $u_t$", ha="center", va="bottom", fontsize=9, color="#555555")
    box(ax, 16.25, 3.5, 1.5, 1.0, "$h'_t$", 0.15, edge=GREY, lw=1.6)
    arrow(ax, (14.98, 3.5), (15.5, 3.5))
    ax.set_title("DeepSeekMoE: one token through the MoE layer", fontsize=11)
    return fig


def _example_choice(n_group: int, topk_group: int, k: int, per_group: int):
    """Kept groups and chosen (group, slot) pairs for the picture: the chosen experts dealt
    round the kept groups, inside the slots drawn, so that the example reads at any size."""
    gen = torch.Generator().manual_seed(3)
    kept = sorted(torch.randperm(n_group, generator=gen)[:topk_group].tolist())
    slots = torch.randperm(min(per_group, 8), generator=gen).tolist()
    drawn = min(k, len(kept) * len(slots))
    return kept, {
        (kept[n % len(kept)], slots[(n // len(kept) + n) % len(slots)]) for n in range(drawn)
    }


def _draw_groups(ax, x0, y0, w, h, n_group, per_group, kept, chosen) -> None:
    """One row per group (at most 8 drawn), one square per expert (at most 8 a group)."""
    rows, slots = min(n_group, 8), min(per_group, 8)
    row_h = h / rows
    room = w - 1.7 - (0.9 if per_group > slots else 0.1)  # beside the name, and the "of N"
    size = min(row_h * 0.6, room / (slots * 1.12))
    for r in range(rows):
        y = y0 + h - (r + 1) * row_h
        keep = r in kept
        ax.add_patch(Rectangle((x0, y + 0.08), w, row_h - 0.16, fc=tint(BLUE, 0.12)
                     if keep else "#f2f2f2", ec=BLUE if keep else GREY, lw=1.8 if keep else 0.8))  # fmt: skip
        name = f"group {r}" + (" kept" if keep else "")
        ax.text(x0 + 0.1, y + row_h / 2, name, va="center", fontsize=9,
                color="black" if keep else "#666666", weight="bold" if keep else "normal")  # fmt: skip
        for s in range(slots):
            on = (r, s) in chosen
            ax.add_patch(Rectangle((x0 + 1.55 + s * (size * 1.12), y + row_h / 2 - size / 2),
                         size, size, fc=ORANGE if on else "white", ec="#555555", lw=0.8))  # fmt: skip
        if per_group > slots:
            ax.text(x0 + w - 0.1, y + row_h / 2, f"of {per_group}", ha="right", va="center",
                    fontsize=9)  # fmt: skip
    if n_group > rows:
        ax.text(x0 + w / 2, y0 - 0.1, f"… {n_group} groups in all", ha="center", va="top",
                fontsize=9)  # fmt: skip


# ----------------------------------------------------------------------- notebook 02's plots
def routing_figure(biased, keep, chosen, weights, n_group: int, tokens: int = 4) -> Figure:
    """The gate's decision for the first ``tokens`` tokens: one panel per token, a row per
    group, the colour the biased score s + b; kept groups framed, dropped ones dimmed, chosen
    experts marked with their gating weight — so that a strong expert in a dropped group shows
    as passed over."""
    per_group = biased.shape[1] // n_group
    fig, axes = plt.subplots(1, tokens, figsize=(12, 3.3), sharey=True)
    vmin, vmax = biased.min().item(), biased.max().item()
    for t, ax in enumerate(axes):
        im = ax.imshow(biased[t].view(n_group, per_group), cmap="viridis", vmin=vmin, vmax=vmax)
        for grp in range(n_group):
            if keep[t, grp]:
                ax.add_patch(Rectangle((-0.5, grp - 0.5), per_group, 1, fill=False, ec=RED, lw=2.5))
            else:
                ax.add_patch(Rectangle((-0.5, grp - 0.5), per_group, 1, color="white", alpha=0.6))
        for e, w in zip(chosen[t].tolist(), weights[t].tolist()):
            ax.text(e % per_group, e // per_group, f"{w:.2f}", ha="center", va="center",
                    fontsize=9, color="white", weight="bold",
                    bbox=dict(boxstyle="circle,pad=0.15", fc=RED, ec="none", alpha=0.85))  # fmt: skip
        ax.set(xticks=range(per_group), xlabel="expert in group", title=f"token {t}")
    axes[0].set_yticks(range(n_group), [f"group {i}" for i in range(n_group)])
    fig.colorbar(im, ax=axes, label="biased score s + b", shrink=0.85)
    fig.suptitle("kept groups (red frame), chosen experts (red dot: gating weight)")
    return fig


def collapse_figure(rows: list[dict], noise_floor: float, n_routed: int, k: int, layer: int = 1):
    """Routing collapse in a run without balancing: MaxVio per MoE layer against the noise
    floor and the ceiling N_r/K_r − 1, the load of one MoE layer over training, and its last
    load sorted. Returns (figure, the sorted last shares)."""
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.25, 1.2, 1]})
    for i, series in enumerate(zip(*[r["maxvio_per_layer"] for r in rows])):
        axes[0].plot(steps, series, label=f"MoE layer {i}")
    axes[0].axhline(noise_floor, ls="--", c=GREY, label="fair routing (noise)")
    axes[0].axhline(n_routed / k - 1, ls=":", c="k", label="ceiling: chosen by all")
    axes[0].set(xlabel="step", ylabel="MaxVio", title="MaxVio, no balancing",
                ylim=(0, 1.1 * (n_routed / k - 1)))  # fmt: skip
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    hist = torch.tensor([r["expert_load"][layer] for r in rows]).T  # [experts, logged steps]
    im = axes[1].imshow(hist, aspect="auto", cmap="magma",
                        extent=(0, steps[-1], n_routed - 0.5, -0.5))  # fmt: skip
    fig.colorbar(im, ax=axes[1], label="share of routed slots")
    axes[1].set(xlabel="step", ylabel="expert", title=f"load of MoE layer {layer}")
    share = hist[:, -1].sort(descending=True).values
    axes[2].bar(range(n_routed), share * 100, color=BLUE)
    axes[2].axhline(100 / n_routed, ls="--", c=GREY, label=f"balanced: {100 / n_routed:.2f}%")
    axes[2].set(xlabel="experts, most loaded first", ylabel="% of routed slots",
                title=f"MoE layer {layer} at step {steps[-1]}")  # fmt: skip
    axes[2].legend(loc="upper center", bbox_to_anchor=(0.5, -0.25))
    return fig, share


MODE_COLORS = {"none": RED, "aux-loss": ORANGE, "aux-free": BLUE}


def three_ways_figure(runs: dict[str, list[dict]], noise_floor: float, entropy: float) -> Figure:
    """MaxVio and validation loss of the three balancing rules, plus the last evaluations
    zoomed in a panel of their own (an inset would cover the curves)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), gridspec_kw={"width_ratios": [1.3, 1.1, 0.8]})
    for mode, rows in runs.items():
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        axes[0].plot([r["step"] for r in rows], [r["maxvio"] for r in rows],
                     c=MODE_COLORS[mode], label=mode)  # fmt: skip
        axes[1].plot(*zip(*val), "o-", c=MODE_COLORS[mode], ms=4)
        axes[2].plot(*zip(*val[-3:]), "o-", c=MODE_COLORS[mode], ms=5)
    axes[0].axhline(noise_floor, ls="--", c=GREY, label="fair routing (noise)")
    axes[0].set(xlabel="step", ylabel="MaxVio (mean of MoE layers)", title="Load imbalance")
    axes[1].axhline(entropy, ls="--", c=GREY)
    axes[1].set(xlabel="step", ylabel="nats / token", title="Validation loss")
    axes[2].set(xlabel="step", title="last 3 evaluations")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4)
    axes[1].text(0.02, 0.04, "dashed: unigram entropy", transform=axes[1].transAxes, fontsize=9)
    return fig


def bias_figure(bias: torch.Tensor, steps: int) -> Figure:
    """``e_score_correction_bias`` per expert and MoE layer ([layers, experts]) after a run."""
    n_layers, n_experts = bias.shape
    width = 0.8 / n_layers
    fig, ax = plt.subplots(figsize=(9, 2.9))
    for layer, row in enumerate(bias):
        x = torch.arange(n_experts) + width * (layer - (n_layers - 1) / 2)
        ax.bar(x, row, width=width, label=f"MoE layer {layer}")
    ax.axhline(0, c="k", lw=0.8)
    ax.set(xlabel="expert", ylabel="bias $b_i$", title=f"bias after {steps} aux-free steps")
    legend_outside(ax)
    return fig


def smooth(values: Sequence[float], window: int = 10) -> torch.Tensor:
    """Running mean over ``window`` steps, so that curves read through batch-to-batch noise."""
    return torch.tensor(values).unfold(0, window, 1).mean(dim=1)


def gamma_figure(curves: dict[float, list[float]], noise_floor: float) -> Figure:
    """MaxVio of the bias rule on the same routing problem for several γ (running mean of 10)."""
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for gm, c in curves.items():
        ax.plot(torch.arange(9, len(c)), smooth(c), label=f"γ = {gm:g}", lw=1.3)
    ax.axhline(noise_floor, ls="--", c=GREY, label="fair routing (noise)")
    ax.set(xlabel="step", ylabel="MaxVio (running mean of 10)",
           title="aux-free bias update on a skewed routing problem")  # fmt: skip
    legend_outside(ax)
    return fig


def gamma_explorer(simulate: Callable[..., list[float]], reference: list[float],
                   noise_floor: float, gamma: float = 1e-2) -> None:  # fmt: skip
    """A γ slider over ``simulate(gamma, steps=...)``: MaxVio against the unbalanced
    ``reference`` and, beside it, γ/3 and 3γ over a shorter run. The figure at ``gamma`` is drawn
    when the cell runs, so the saved notebook shows it where no kernel moves the slider."""
    import ipywidgets as widgets

    def draw(gamma: float) -> Figure:
        curve = simulate(gamma)
        fig, (ax0, ax1) = plt.subplots(
            1, 2, figsize=(12, 3.2), gridspec_kw={"width_ratios": [2, 1]}
        )
        x = torch.arange(9, len(curve))
        ax0.plot(x, smooth(reference), c=RED, lw=1.3, label="γ = 0 (no balancing)")
        ax0.plot(x, smooth(curve), c=BLUE, lw=1.3, label=f"γ = {gamma:.2g}")
        ax0.axhline(noise_floor, ls="--", c=GREY, label="fair routing (noise)")
        ax0.set(xlabel="step", ylabel="MaxVio (running mean of 10)",
                title=f"γ = {gamma:.2g}: mean MaxVio, last 100 steps {sum(curve[-100:]) / 100:.2f}")  # fmt: skip
        ax0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
        tails = [sum(simulate(g, steps=150)[-50:]) / 50 for g in (gamma / 3, gamma, gamma * 3)]
        ax1.bar(["γ/3", "γ", "3γ"], tails, color=[GREY, BLUE, GREY])
        ax1.set(ylabel="MaxVio, steps 100–150", title="neighbours, 150 steps")
        return fig

    slider = widgets.FloatLogSlider(value=gamma, base=10, min=-4, max=-0.5, step=0.25,
                                    description="γ", readout_format=".1e")  # fmt: skip
    explorer(draw, {"gamma": slider})
