"""Pipeline schedules of the report's Table 2 (§3.2.1, Figure 5), and a simulator to time them.

A schedule is, for every rank, the ordered list of the ops it runs:

* ``F``  forward of one micro-batch through one stage;
* ``B``  full backward (input and weight gradients); ``I`` its "backward for input" half and
  ``W`` its "backward for weights" half — ZeroBubble's split (Qi et al., 2023): only I is on the
  critical path, so W can wait and fill a hole;
* ``FB`` a forward chunk and a backward chunk run *together*: DualPipe's overlapped pair, whose
  communication (all-to-all dispatch/combine, pipeline sends) hides under the other's compute.

Four schedules, for ``pp`` pipeline stages and ``micro_batches`` micro-batches:

* ``1f1b``: ``pp`` ranks, one stage each; ``pp - 1 - r`` warm-up forwards on rank r, then one
  forward and one backward in turn, then the remaining backwards.
* ``zb1p``: 1F1B with B split into I and W; rank r keeps up to r W's pending and runs them when
  it would otherwise wait (ZB-H1: every rank then holds the same number of micro-batches).
* ``dualpipe``: ``pp`` ranks (even), each holding *two* stages: stage r of a pipeline fed from
  rank 0 and stage pp-1-r of one fed from rank pp-1 — micro-batches enter from both ends, half
  each. Eight phases per rank, as in the DualPipe repository: forwards of the near direction,
  forwards of both, zero-bubble backwards interleaved with forwards, the steady state of
  overlapped F&B pairs, and a drain that defers half the weight gradients into the holes.
* ``dualpipev``: the same schedule on ``pp / 2`` ranks, "cut in half": rank r holds stages r and
  pp-1-r of one pipeline that goes down the ranks and comes back (a V).

``simulate`` times a schedule from dependencies alone: an op starts when its rank is free and
its inputs exist (the previous stage's forward; the next stage's backward; its own forward;
W after its I). Communication costs nothing, as it does in Table 2 (DualPipe hides it).

**Bubble** (Table 2's convention): the step ends when the last rank finishes (the optimizer
waits for all); a rank's bubble is that makespan minus the time it spent running ops (an F&B
pair counts ``FB``); ``Simulation.bubble`` is the largest over the ranks. For 1F1B and ZB1P every
rank idles equally; for DualPipe the middle ranks, which run the most overlapped pairs, idle
most. With at least PP micro-batches (fewer never fill the pipeline, and Table 2 does not
count that case), the simulated bubbles equal Table 2's formulas (tests/test_schedules.py) for

* 1F1B — (PP-1)(F+B): any F, B;
* ZB1P — (PP-1)(F+B-2W): when W <= F and W <= B-W (a W fits in every hole it fills);
* DualPipe and DualPipeV — (PP/2-1)(F&B+B-3W): when a forward chunk takes as long as a
  backward-for-input chunk (F = B-W, Figure 5's proportions) and W <= F, for any F&B between
  B and F+B. Off that line the dependency-driven bubble differs from the formula (11.6 against
  12.9 at PP=8 for F=1.3, B=2.9, W=0.7, F&B=3.5): the simulator reports what the schedule
  does, the formula what the table says.

Memory, per rank, in Table 2's units: **parameters** as the number of stages held (1F1B/ZB1P 1,
DualPipe/V 2 — two copies); **activations** as the peak number of (micro-batch, stage) forwards
whose backward has not finished — a forward allocates when it starts, a backward (B or I) frees
when it ends, so an F&B pair briefly holds both: PP, PP, PP+1. (What a deferred W keeps is
not counted — neither does Table 2, whose ZB1P column equals 1F1B's.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Op:
    """One entry of a rank's schedule. ``chunk`` picks which of the rank's stages runs it
    (always 0 for 1F1B/ZB1P); an FB pair also names its backward half (``b_mb``, ``b_chunk``)."""

    kind: str  # "F", "B", "I", "W" or "FB"
    mb: int
    chunk: int = 0
    b_mb: int | None = None
    b_chunk: int | None = None

    def parts(self) -> tuple[Op, ...]:
        """The single ops it stands for: an FB pair is its F and its (full) B."""
        if self.kind == "FB":
            return (Op("F", self.mb, self.chunk), Op("B", self.b_mb, self.b_chunk))
        return (self,)

    def __str__(self) -> str:
        """F3, B2', F7&B3' ...: a prime marks the second chunk (Figure 5's reverse direction)."""
        if self.kind == "FB":
            return "&".join(str(part) for part in self.parts())
        prime = "'" * self.chunk
        return f"{self.kind}{self.mb}{prime}"


@dataclass(frozen=True)
class Layout:
    """Where stages live: ``pp`` stages of ``pipes`` pipelines on ``ranks`` ranks, ``chunks``
    stages per rank. DualPipe runs two pipelines (one per direction) over the same stages."""

    kind: str
    pp: int
    ranks: int
    chunks: int
    pipes: int

    def stage(self, rank: int, chunk: int) -> tuple[int, int]:
        """(pipe, stage) that ``chunk`` of ``rank`` runs."""
        if chunk == 0:
            return 0, rank
        if self.kind == "dualpipe":
            return 1, self.pp - 1 - rank  # the reverse direction enters at rank pp-1
        return 0, self.pp - 1 - rank  # DualPipeV: the V's way back up

    def owner(self, pipe: int, stage: int) -> tuple[int, int]:
        """(rank, chunk) that runs ``stage`` of ``pipe``."""
        if pipe == 1:
            return self.pp - 1 - stage, 1
        if stage < self.ranks:
            return stage, 0
        return self.pp - 1 - stage, 1


def layout(kind: str, pp: int) -> Layout:
    """The placement of ``pp`` stages for a schedule kind (validates kind and pp)."""
    if kind not in KINDS:
        raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp (pipeline stages) must be a positive integer, got {pp!r}")
    if kind in ("dualpipe", "dualpipev") and pp % 2:
        raise ValueError(
            f"{kind} needs an even number of pipeline stages (two directions / a V), got pp={pp}"
        )
    if kind == "dualpipe":
        return Layout(kind, pp, ranks=pp, chunks=2, pipes=2)
    if kind == "dualpipev":
        return Layout(kind, pp, ranks=pp // 2, chunks=2, pipes=1)
    return Layout(kind, pp, ranks=pp, chunks=1, pipes=1)


def micro_batches_per_pipe(kind: str, pp: int, micro_batches: int) -> int:
    """How many micro-batches enter each pipe; raises ValueError when the count cannot work."""
    minimum = {"1f1b": 1, "zb1p": 1, "dualpipe": 2 * pp, "dualpipev": pp}[kind]
    if not isinstance(micro_batches, int) or micro_batches < minimum:
        raise ValueError(
            f"{kind} with pp={pp} needs micro_batches >= {minimum}, got {micro_batches!r}"
        )
    if kind == "dualpipe":
        if micro_batches % 2:
            raise ValueError(
                f"dualpipe splits micro-batches between two directions: need an even count, "
                f"got {micro_batches}"
            )
        return micro_batches // 2
    return micro_batches


def schedule(kind: str, pp: int, micro_batches: int) -> list[list[Op]]:
    """Every rank's ordered ops for ``micro_batches`` micro-batches over ``pp`` stages."""
    lay = layout(kind, pp)
    n = micro_batches_per_pipe(kind, pp, micro_batches)
    if kind in ("1f1b", "zb1p"):
        return [_one_f_one_b(pp, r, n, zero_bubble=kind == "zb1p") for r in range(pp)]
    return [_dualpipe(lay, r, n) for r in range(lay.ranks)]


def _one_f_one_b(pp: int, rank: int, m: int, zero_bubble: bool) -> list[Op]:
    """1F1B on one rank; with ``zero_bubble``, I instead of B and up to ``rank`` W's deferred."""
    warmup = min(pp - 1 - rank, m)
    ops = [Op("F", i) for i in range(warmup)]
    pending: list[int] = []

    def backward(i: int) -> None:
        if not zero_bubble:
            ops.append(Op("B", i))
            return
        ops.append(Op("I", i))
        pending.append(i)
        if len(pending) > rank:  # ZB-H1: keep `rank` W's back for the drain's holes
            ops.append(Op("W", pending.pop(0)))

    for i in range(warmup, m):
        ops.append(Op("F", i))
        backward(i - warmup)
    for i in range(m - warmup, m):
        backward(i)
    ops += [Op("W", i) for i in pending]
    return ops


def _dualpipe(lay: Layout, rank: int, n: int) -> list[Op]:
    """DualPipe (or DualPipeV) on one rank: the eight phases, ``n`` micro-batches per pipe.

    ``near`` is the chunk whose micro-batches enter on this rank's side (rank 0's half for
    DualPipe's first half, the other end for the second half; always chunk 0 in the V), ``far``
    the other. ``half`` ranks sit between a pipe's entry and the turning point, ``h`` is this
    rank's distance from its entry.
    """
    half = lay.pp // 2
    h = min(rank, lay.ranks - 1 - rank) if lay.kind == "dualpipe" else rank
    near = 1 if lay.kind == "dualpipe" and rank >= half else 0
    far = 1 - near
    middle = h == half - 1  # next to the turning point
    ops: list[Op] = []
    f_next, b_next = [0, 0], [0, 0]
    deferred: list[tuple[int, int]] = []

    def fwd(c: int) -> None:
        ops.append(Op("F", f_next[c], c))
        f_next[c] += 1

    def bwd(c: int, split: bool = False) -> None:
        if split:  # input gradient now, weight gradient later (zero-bubble)
            ops.append(Op("I", b_next[c], c))
            deferred.append((b_next[c], c))
        else:
            ops.append(Op("B", b_next[c], c))
        b_next[c] += 1

    def weights() -> None:
        mb, c = deferred.pop(0)
        ops.append(Op("W", mb, c))

    def pair(fc: int, bc: int) -> None:
        ops.append(Op("FB", f_next[fc], fc, b_next[bc], bc))
        f_next[fc] += 1
        b_next[bc] += 1

    for _ in range(2 * (half - h - 1)):  # 1: forwards of the near direction
        fwd(near)
    for _ in range(h + 1):  # 2: forwards of both directions
        fwd(near)
        fwd(far)
    for _ in range(half - h - 1):  # 3: zero-bubble backwards, weights right away
        bwd(far, split=True)
        weights()
        fwd(far)
    for i in range(n - 2 * half + h + 1):  # 4: the steady state, overlapped pairs
        if i == 0 and middle:  # its forward is awaited across the turn: do not delay it
            fwd(near)
            bwd(far)
        else:
            pair(near, far)
        pair(far, near)
    for _ in range(half - h - 1):  # 5: the far direction's backwards catch up
        bwd(far)
        pair(far, near)
    split = False
    for i in range(h + 1):  # 6: backwards of both; the second half defers its W's
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        bwd(far, split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        bwd(near, split)
    for _ in range(half - h - 1):  # 7: a deferred W, then a zero-bubble backward
        weights()
        bwd(near, split=True)
    for _ in range(h + 1):  # 8: the remaining W's fill the drain
        weights()
    return ops


@dataclass
class Simulation:
    """A simulated step: per-rank timelines of (op, start, end), the makespan, the bubbles
    (see the module docstring), and per-rank memory in Table 2's units."""

    kind: str
    pp: int
    micro_batches: int
    durations: dict[str, float]
    timelines: list[list[tuple[Op, float, float]]]
    makespan: float
    bubbles: list[float]
    parameters: list[int]
    activations: list[int]
    layout: Layout = field(repr=False)

    @property
    def bubble(self) -> float:
        """The largest per-rank bubble (Table 2's "Bubble" column)."""
        return max(self.bubbles)


def simulate(
    kind: str,
    pp: int,
    micro_batches: int,
    F: float = 1.0,
    B: float = 2.0,
    W: float = 1.0,
    FB: float | None = None,
) -> Simulation:
    """Time ``schedule(kind, pp, micro_batches)`` with chunk durations F (forward), B (full
    backward), W (its weight half; I = B - W) and FB (an overlapped F&B pair, default F + B)."""
    FB = F + B if FB is None else FB
    if not (F > 0 and B > 0 and 0 <= W < B and FB > 0):
        raise ValueError(
            f"durations need F > 0, B > 0, 0 <= W < B, FB > 0; got {F=}, {B=}, {W=}, {FB=}"
        )
    lay = layout(kind, pp)
    plan = schedule(kind, pp, micro_batches)
    duration = {"F": F, "B": B, "I": B - W, "W": W, "FB": FB}
    done: dict[tuple[str, int, int, int], float] = {}  # (F|B|W, pipe, mb, stage) -> end time

    def key(kind_: str, rank: int, op: Op) -> tuple[str, int, int, int]:
        pipe, stage = lay.stage(rank, op.chunk)
        return ("B" if kind_ == "I" else kind_), pipe, op.mb, stage

    def inputs(rank: int, op: Op) -> list[tuple[str, int, int, int]]:
        pipe, stage = lay.stage(rank, op.chunk)
        if op.kind == "F":
            return [("F", pipe, op.mb, stage - 1)] if stage > 0 else []
        if op.kind == "W":
            return [("B", pipe, op.mb, stage)]
        deps = [("F", pipe, op.mb, stage)]
        if stage < pp - 1:
            deps.append(("B", pipe, op.mb, stage + 1))
        return deps

    timelines: list[list[tuple[Op, float, float]]] = [[] for _ in plan]
    cursor = [0] * len(plan)
    free = [0.0] * len(plan)
    progress = True
    while progress:  # sweep the ranks, running every op whose inputs exist, until none can
        progress = False
        for r, ops in enumerate(plan):
            while cursor[r] < len(ops):
                op = ops[cursor[r]]
                deps = [d for part in op.parts() for d in inputs(r, part)]
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                end = start + duration[op.kind]
                for part in op.parts():
                    done[key(part.kind, r, part)] = end
                timelines[r].append((op, start, end))
                free[r], cursor[r], progress = end, cursor[r] + 1, True
    stuck = [r for r, ops in enumerate(plan) if cursor[r] < len(ops)]
    if stuck:
        raise RuntimeError(f"{kind} schedule deadlocks: ranks {stuck} wait on inputs never made")
    makespan = max(t[-1][2] for t in timelines)
    bubbles = [makespan - sum(e - s for _, s, e in t) for t in timelines]
    return Simulation(
        kind=kind,
        pp=pp,
        micro_batches=micro_batches,
        durations={"F": F, "B": B, "W": W, "FB": FB},
        timelines=timelines,
        makespan=makespan,
        bubbles=bubbles,
        parameters=[lay.chunks] * lay.ranks,
        activations=[_peak_activations(lay, r, t) for r, t in enumerate(timelines)],
        layout=lay,
    )


def _peak_activations(lay: Layout, rank: int, timeline: list[tuple[Op, float, float]]) -> int:
    """Peak count of forwards started whose backward (B or I) has not ended, on one rank."""
    events = []  # (time, +1 alloc / -1 free); frees sort first at equal times
    for op, start, end in timeline:
        for part in op.parts():
            if part.kind == "F":
                events.append((start, 1))
            elif part.kind in ("B", "I"):
                events.append((end, -1))
    live = peak = 0
    for _, delta in sorted(events):
        live += delta
        peak = max(peak, live)
    return peak


def table2(kind: str, pp: int, F: float, B: float, W: float, FB: float | None = None) -> dict:
    """Table 2's row for ``kind``: bubble formula, parameters (× one stage) and activations
    (× one micro-batch's stage activations). DualPipeV's row is DualPipe's on pp/2 devices."""
    FB = F + B if FB is None else FB
    layout(kind, pp)
    if kind == "1f1b":
        return {"bubble": (pp - 1) * (F + B), "parameters": 1, "activations": pp}
    if kind == "zb1p":
        return {"bubble": (pp - 1) * (F + B - 2 * W), "parameters": 1, "activations": pp}
    return {"bubble": (pp / 2 - 1) * (FB + B - 3 * W), "parameters": 2, "activations": pp + 1}


# Figure 5's colours, from the course palette (dsv3lite.viz.style): F orange, B green, its
# input half I a lighter green, W blue; the second chunk (reverse direction / the V's way back)
# is the same hue, darker.
_COLORS = {"F": "#E69F00", "B": "#009E73", "I": "#7FCEB9", "W": "#56B4E9"}
_DARK = {"F": "#A66F00", "B": "#00664B", "I": "#3F9A82", "W": "#0072B2"}
MAX_LABELS = 200  # more ops than this in one plot: no per-op numbers (they would be unreadable)


def plot_schedule(sim: Simulation, ax=None, title: str | None = None, **kwargs):
    """Draw a simulated schedule Figure-5 style (see ``plot_timelines``, which takes the same
    keyword arguments); returns the Figure."""
    d = sim.durations
    return plot_timelines(
        sim.timelines,
        ax=ax,
        title=title
        or f"{sim.kind}: PP={sim.pp}, {sim.micro_batches} micro-batches, bubble {sim.bubble:g}",
        xlabel="time (F = {F:g}, B = {B:g}, W = {W:g}, F&B = {FB:g})".format(**d),
        forward_share=d["F"] / (d["F"] + d["B"]),
        **kwargs,
    )


def plot_timelines(
    timelines: list[list[tuple[Op, float, float]]],
    ax=None,
    title: str = "",
    xlabel: str = "time",
    forward_share: float = 1 / 3,
    labels: bool | None = None,
    legend: bool = True,
):
    """One row per rank, time to the right: F orange, B green, I light green, W blue; an F&B
    pair is drawn as its forward and backward parts (``forward_share`` of it the forward) in one
    frame. The second chunk (the reverse direction, or the V's way back) is darker. Works for
    simulated and measured timelines. Returns the matplotlib Figure (no pyplot: the caller's
    backend is left alone).

    Drawn as one ``PolyCollection`` per op kind and chunk, plus one for the frames, so a plot
    of thousands of ops is a dozen artists and redraws in a fraction of a second (one Rectangle
    artist per op made a widget take many seconds). The micro-batch number is written in each
    cell wide enough for it when ``labels`` is True; by default (None) only when the plot has at
    most ``MAX_LABELS`` ops. The legend (``legend=True``) sits to the right of the axes."""
    import numpy as np
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..viz.style import DPI

    if ax is None:
        fig = Figure(figsize=(11, 0.3 * len(timelines) + 1.2), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
    end_time = max(t[-1][2] for t in timelines)
    cells: dict[tuple[str, int], list] = {}  # (kind, chunk) -> (start, end, row) of its bars
    frames, texts = [], []
    for r, timeline in enumerate(timelines):
        for op, start, end in timeline:
            if op.kind == "FB":
                cut = start + (end - start) * forward_share
                parts = [(op.parts()[0], start, cut), (op.parts()[1], cut, end)]
            else:
                parts = [(op, start, end)]
            for part, s, e in parts:
                cells.setdefault((part.kind, part.chunk), []).append((s, e, r))
                texts.append((part.mb, s, e, r))
            frames.append((start, end, r))

    def boxes(spans: list[tuple[float, float, int]]):
        """(start, end, row) -> the corners of each bar, one array for a whole collection."""
        s, e, r = np.asarray(spans, dtype=float).T
        lo, hi = r - 0.42, r + 0.42
        return np.stack([np.stack(c, axis=1) for c in ((s, lo), (s, hi), (e, hi), (e, lo))], 1)

    for (kind, chunk), spans in sorted(cells.items()):
        coll = PolyCollection(
            boxes(spans), facecolor=(_DARK if chunk else _COLORS)[kind], edgecolor="none"
        )
        coll.set_gid(f"ops:{kind}{chunk}")
        ax.add_collection(coll)
    coll = PolyCollection(boxes(frames), facecolor="none", edgecolor="#333333", linewidth=0.4)
    coll.set_gid("ops:frame")
    ax.add_collection(coll)
    if labels or (labels is None and len(texts) <= MAX_LABELS):
        points_per_time = ax.bbox.width / end_time * 72 / ax.figure.dpi
        for mb, s, e, r in texts:  # a 9 pt digit is about 5.5 pt wide
            if (e - s) * points_per_time >= 5.5 * len(str(mb)) + 2:
                ax.text((s + e) / 2, r, str(mb), ha="center", va="center", fontsize=9)
    ax.set_xlim(0, end_time)
    ax.set_ylim(len(timelines) - 0.5, -0.5)
    ax.set_yticks(range(len(timelines)), [f"rank {r}" for r in range(len(timelines))])
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    if legend:
        kinds = sorted({kind for kind, _ in cells}, key="FBIW".index)
        handles = [Patch(facecolor=_COLORS[k], label=k) for k in kinds]
        if any(chunk for _, chunk in cells):
            handles += [Patch(facecolor=_DARK[k], label=f"{k}, 2nd chunk") for k in kinds]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return ax.figure
