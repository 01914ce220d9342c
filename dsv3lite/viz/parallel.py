"""Pictures of the parallelism notebooks (06 expert parallelism, 07 DualPipe), and the plotting
and widget plumbing their cells would otherwise carry.

* ``overlap_figure`` — the idea of §3.2.1's overlap: a forward chunk of one micro-batch and a
  backward chunk of another, run as a pair, so that each one's all-to-all (dispatch before the
  MLP, combine after it) travels while the other computes. Drawn twice on one time axis: one
  chunk after the other, then the pair.
* ``dualpipe_figure`` — the DualPipe schedule itself, drawn from the package's own generator
  (``dsv3lite.parallel.schedules``), so the picture is the schedule the simulator times and the
  runtime executes, not a copy of the report's Figure 5.
* ``schedules_figure`` / ``explore_schedules`` — several schedules, one per row on a shared time
  axis, for comparing and for the explore widget of 07.
* ``sm_figure`` — 06's toy model of SMs spent on communication against bandwidth reached.

The sliders over these figures are ``dsv3lite.viz.widgets.explorer``'s.
"""

from __future__ import annotations

from collections.abc import Callable

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..parallel.schedules import KINDS, Simulation, plot_schedule, simulate
from .diagram import arrow
from .style import COLORS, DPI, legend_outside

FORWARD, BACKWARD = COLORS[1], COLORS[2]  # orange / green, as F and B in the schedules
COMM_FILL = "#FFFFFF"

# (lane, label, chunk, start, duration) in units of a forward attention. A backward chunk
# costs about twice its forward (two matmuls per weight instead of one); each all-to-all is a
# little shorter than the compute it should hide (the report: computation to communication
# about 1 : 1 for the forward chunk).
_ATTN, _MLP, _A2A = 1.0, 1.0, 0.8
_ONE_AFTER_THE_OTHER = [
    ("compute", "attention", "F", 0.0, _ATTN),
    ("comm", "dispatch", "F", 1.0, _A2A),
    ("compute", "MLP", "F", 1.8, _MLP),
    ("comm", "combine", "F", 2.8, _A2A),
    ("comm", "combine", "B", 3.6, _A2A),
    ("compute", "MLP", "B", 4.4, 2 * _MLP),
    ("comm", "dispatch", "B", 6.4, _A2A),
    ("compute", "attention", "B", 7.2, 2 * _ATTN),
]
# the pair: the compute stream alternates the two chunks, each all-to-all runs under the other
# chunk's next compute block, and every block still starts after what it depends on
_OVERLAPPED = [
    ("compute", "attention", "F", 0.0, _ATTN),
    ("comm", "combine", "B", 0.0, _A2A),
    ("compute", "MLP", "B", 1.0, 2 * _MLP),
    ("comm", "dispatch", "F", 1.0, _A2A),
    ("compute", "MLP", "F", 3.0, _MLP),
    ("comm", "dispatch", "B", 3.0, _A2A),
    ("compute", "attention", "B", 4.0, 2 * _ATTN),
    ("comm", "combine", "F", 4.0, _A2A),
]


def _blocks(ax, blocks) -> float:
    """Draw (lane, label, chunk, start, duration) blocks: compute filled with its chunk's
    colour, communication white with a thick edge of that colour (it is the same micro-batch's
    data, on the wire). Returns the end of the last block."""
    lanes = {"compute": 1.0, "comm": 0.0}
    for lane, label, chunk, start, dur in blocks:
        color = FORWARD if chunk == "F" else BACKWARD
        comm = lane == "comm"
        ax.add_patch(
            Rectangle(
                (start + 0.03, lanes[lane] - 0.35),
                dur - 0.06,
                0.7,
                facecolor=COMM_FILL if comm else color,
                edgecolor=color if comm else "#333333",
                linewidth=2.5 if comm else 0.8,
                hatch="//" if comm else None,
            )
        )
        ax.text(
            start + dur / 2,
            lanes[lane],
            f"{label}\n({'fwd' if chunk == 'F' else 'bwd'})",
            ha="center",
            va="center",
            fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5} if comm else None,
        )
    ax.set_yticks([1.0, 0.0], ["compute", "all-to-all"])
    ax.set_ylim(-0.6, 1.6)
    return max(start + dur for _, _, _, start, dur in blocks)


def overlap_figure() -> Figure:
    """A forward chunk (micro-batch 1) and a backward chunk (micro-batch 0) on one rank, first
    one after the other, then as DualPipe's overlapped pair.

    Why: under expert parallelism each chunk's MLP is preceded by a dispatch all-to-all and
    followed by a combine all-to-all, and the report puts computation and communication at
    about 1 : 1. Run alone, a chunk leaves the rank idle during each exchange (the gaps in the
    upper row). Paired with a chunk of *another* micro-batch, the exchange of one runs while the
    other computes: the compute stream never waits, and the pair ends when its compute ends.
    The order of the pair — attention (fwd), MLP (bwd), MLP (fwd), attention (bwd) — is chosen
    so that every all-to-all has a compute block of the other chunk to hide under. (The report
    also splits each backward into input and weight parts and overlaps the pipeline's own
    sends; this drawing keeps only the all-to-alls.) Block lengths are illustrative, in units of
    one forward attention."""
    fig = Figure(figsize=(10, 4.6), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    alone = _blocks(top, _ONE_AFTER_THE_OTHER)
    paired = _blocks(bottom, _OVERLAPPED)
    top.set_title("one chunk after the other: the rank computes nothing during an all-to-all")
    bottom.set_title("DualPipe's pair: each chunk's all-to-all runs under the other's compute")
    for start, dur in [(1.0, _A2A), (2.8, 2 * _A2A), (6.4, _A2A)]:  # idle compute in the top
        top.axvspan(start, start + dur, ymin=0.62, ymax=0.93, color="#DDDDDD", zorder=0)
    top.text(3.6, 1.0, "compute idle", ha="center", va="center", fontsize=9, color="#555555")
    for ax in (top, bottom):
        ax.axvline(alone, color="#555555", lw=1, ls=":")
    arrow(bottom, (paired, 0.45), (alone, 0.45), style="<|-|>", lw=1.0)
    bottom.text(
        (paired + alone) / 2,
        0.62,
        f"saved: {alone - paired:.1f} of {alone:.1f}",
        ha="center",
        va="bottom",
        fontsize=9,
    )
    bottom.set_xlim(0, alone + 0.3)
    bottom.set_xlabel("time (one forward attention = 1)")
    handles = [
        Patch(facecolor=FORWARD, edgecolor="#333333", label="forward chunk, micro-batch 1"),
        Patch(facecolor=BACKWARD, edgecolor="#333333", label="backward chunk, micro-batch 0"),
        Patch(facecolor=COMM_FILL, edgecolor="#333333", hatch="//", label="its all-to-all"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3)
    return fig


def dualpipe_figure(
    pp: int = 8,
    micro_batches: int = 20,
    F: float = 1.0,
    B: float = 2.0,
    W: float = 1.0,
    FB: float = 3.0,
) -> Figure:
    """The DualPipe schedule for ``pp`` ranks and ``micro_batches`` micro-batches, as
    ``dsv3lite.parallel.schedules.simulate`` times it: one row per rank, one bar per op.

    Why drawn from the generator: the picture is then the schedule itself — the one the
    simulator's bubble comes from and ``PipelineRuntime`` runs — and it redraws for any PP and
    number of micro-batches. Read it for the two directions: micro-batches 0, 1, ... enter at
    rank 0 (light colours, running down the ranks) and at rank PP−1 (dark colours, running up);
    in the middle every rank runs overlapped pairs, a forward of one direction framed together
    with a backward of the other (the pair of ``overlap_figure``); at the end the W's (weight
    gradients) fill the drain. Defaults: the report's Figure 5 setting (PP=8, 20 micro-batches,
    F=1, B=2, W=1, and a pair as long as F+B)."""
    sim = simulate("dualpipe", pp, micro_batches, F=F, B=B, W=W, FB=FB)
    fig = Figure(figsize=(12, 0.34 * pp + 1.4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    plot_schedule(
        sim,
        ax=ax,
        labels=True,
        legend=False,
        title=f"DualPipe: {pp} ranks, {micro_batches} micro-batches ({micro_batches // 2} from "
        f"each end); bubble {sim.bubble:g} per rank",
    )
    _legend_below(fig, [ax])
    return fig


def _legend_below(fig: Figure, axes: list) -> None:
    """The schedule legend (the op kinds drawn, both chunks) under the figure, off the data."""
    from ..parallel.schedules import _COLORS, _DARK

    drawn = {
        (c.get_gid()[4], c.get_gid()[5] == "1")
        for ax in axes
        for c in ax.collections
        if (c.get_gid() or "").startswith("ops:") and c.get_gid()[4] in "FBIW"
    }
    handles = [Patch(facecolor=_COLORS[k], label=f"{k}") for k in "FBIW" if (k, False) in drawn]
    handles += [
        Patch(facecolor=_DARK[k], label=f"{k}, 2nd chunk") for k in "FBIW" if (k, True) in drawn
    ]
    handles.append(Patch(facecolor="none", edgecolor="#333333", label="one op (F&B: a pair)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))


def schedules_figure(sims: list[Simulation], labels: bool | None = None) -> Figure:
    """Several simulated schedules, one per row on a shared time axis, so their lengths (and
    bubbles) compare at a glance; the legend once, below. ``labels`` as in ``plot_timelines``
    (by default, numbers only where a schedule has few enough ops to read them)."""
    heights = [0.26 * len(s.timelines) + 0.9 for s in sims]
    fig = Figure(figsize=(12, sum(heights) + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(sims), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    axes = [axes] if len(sims) == 1 else list(axes)
    for ax, s in zip(axes, sims):
        plot_schedule(s, ax=ax, labels=labels, legend=False)
        if len(s.timelines) > 8:  # keep tick labels ≥ 9 pt legible: every other rank
            ax.set_yticks(range(0, len(s.timelines), 2))
        if ax is not axes[-1]:
            ax.set_xlabel("")
    axes[-1].set_xlim(0, max(s.makespan for s in sims))
    _legend_below(fig, axes)
    return fig


def explore_schedules(
    pp: int = 8,
    micro_batches: int = 20,
    F: float = 1.0,
    B: float = 2.0,
    W: float = 1.0,
    FB: float = 2.5,
) -> Figure:
    """The four schedules of ``KINDS`` for one setting, one per row. Each kind gets the
    micro-batches it can take (DualPipe at least 2·PP and an even count, the others at least
    PP); W is capped just under B (the simulator needs I = B − W > 0). Drawn with collections
    and without per-op numbers once crowded, so a slider redraw stays well under a second."""
    sims = []
    for kind in KINDS:
        m = max(micro_batches, 2 * pp) if kind == "dualpipe" else max(micro_batches, pp)
        m += m % 2 if kind == "dualpipe" else 0
        sims.append(simulate(kind, pp, m, F, B, min(W, 0.99 * B), FB))
    return schedules_figure(sims)


def sm_figure(
    ib_bandwidth: Callable[[int, float], float],
    layer_time: Callable[[int, float, float], float],
    ratio: float = 1.0,
    b: float = 21.0,
    forward: float = 3.2,
) -> tuple[Figure, int]:
    """06's toy model drawn from the notebook's own functions: IB and NVLink bandwidth reached
    against SMs given to communication (left, the report's 20 SMs dashed), and the layer time
    with overlap, the longer of compute and communication (right, its best SM count marked).
    Returns the figure and that best count, for even SM counts 2 … 40."""
    sms = list(range(2, 41, 2))
    best = min(sms, key=lambda s: layer_time(s, ratio, b))
    fig = Figure(figsize=(11, 3.4), dpi=DPI, layout="constrained")
    ax0, ax1 = fig.subplots(1, 2)
    ax0.plot(sms, [ib_bandwidth(s, b) for s in sms], label="IB reached")
    ax0.plot(sms, [forward * ib_bandwidth(s, b) for s in sms], label="NVLink reached")
    ax0.axvline(20, color="gray", ls="--", lw=1, label="the report's 20 SMs")
    ax0.set(xlabel="SMs for communication", ylabel="GB/s", title=f"{b:.0f} GB/s per channel")
    legend_outside(ax0)
    ax1.plot(sms, [layer_time(s, ratio, b) for s in sms], color=COLORS[0])
    ax1.plot([best], [layer_time(best, ratio, b)], "o", color=COLORS[3])
    ax1.set(
        xlabel="SMs for communication",
        ylabel="layer time (compute alone = 1)",
        title=f"comm:compute {ratio:g}:1 → best {best} SMs",
        ylim=(0.9, 3),
    )
    return fig, best
