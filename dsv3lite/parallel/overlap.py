"""Two-micro-batch overlap of expert-parallel communication with computation (§3.2.2, §3.4).

An MoE layer under expert parallelism alternates compute with three collectives (the counts'
layout exchange, dispatch, combine) during which a rank has nothing to do but wait. Splitting
the layer's tokens into two micro-batches gives it something: while micro-batch 0's tokens
travel, compute its shared experts, then micro-batch 1's routed experts, and so on
(``OVERLAPPED``; ``ExpertParallelDispatcher(overlap=True)`` runs it):

    compute:  plan0  shared0  plan1  experts0  shared1  experts1  finish0  finish1
    comm:     layout0/1  dispatch0  dispatch1  combine0      combine1

The collectives are started with ``async_op=True`` (gloo runs them on its own threads; NCCL on
its own CUDA stream, concurrently with the compute stream) and awaited just before their
result is needed: a ``Pending``. The result equals the non-overlapped layer up to the
rounding of splitting the experts' matmuls in two: same ops, on halves, in another order.
(The report's deployment also hides them under the other micro-batch's attention, which is
outside the MoE layer; here the shared and routed experts hide them.)

``Timeline`` records, per rank, the wall-clock interval of every compute op and every
collective (from its start to its completion: a callback on the work's future, or the return of
``wait`` if that came first), and reports the fraction of communication time during which the
rank was computing. It is a host-clock instrument: on a GPU kernels run asynchronously to the
host, so use the CUDA profiler there.

On a CPU, gloo's transfers are memory copies and loopback TCP run by the same cores that
compute, and its threads compete with the compute for them: the overlap hides waiting (for a
slower rank, for a message in flight), not that work. ``python -m dsv3lite bench comm``
measures how much it hides.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# (step, micro-batch): what ExpertParallelDispatcher runs, in order. Each step of a micro-batch
# awaits the collective its previous step started; the comments say what a step hides.
OVERLAPPED = [
    ("layout", 0),
    ("layout", 1),
    ("dispatch", 0),
    ("shared", 0),  # hides dispatch 0, layout 1
    ("dispatch", 1),
    ("experts", 0),  # hides dispatch 1
    ("shared", 1),  # hides combine 0, dispatch 1
    ("experts", 1),  # hides combine 0
    ("finish", 0),  # hides combine 1
    ("finish", 1),
]
SEQUENTIAL = [(step, 0) for step in ("layout", "dispatch", "shared", "experts", "finish")]


class Pending:
    """An exchange in flight: ``wait()`` blocks until it has landed (and, for FP8, dequantizes
    it into the output), once. ``works`` are torch.distributed Work handles."""

    def __init__(self, works: list, finish: Callable[[], None] | None = None) -> None:
        self.works, self.finish, self.done = works, finish, False

    def wait(self) -> None:
        if self.done:
            return
        for work in self.works:
            work.wait()
        if self.finish is not None:
            with torch.no_grad():
                self.finish()
        self.done = True


@dataclass(frozen=True)
class Interval:
    """One op on one rank's timeline, in seconds since the timeline started."""

    kind: str  # "compute" or "comm"
    name: str
    mb: int
    start: float
    end: float


class Timeline:
    """Wall-clock intervals of one rank's compute and communication during one step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.intervals: list[Interval] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    @contextmanager
    def compute(self, name: str, mb: int) -> Iterator[None]:
        start = self.now()
        yield
        self.intervals.append(Interval("compute", name, mb, start, self.now()))

    def comm(self, name: str, mb: int, issue: Callable[[], tuple]) -> tuple:
        """Start a collective with ``issue()`` -> (output, Pending) and record it: from now to
        its completion. Returns (output, a Pending whose ``wait()`` also records the interval)."""
        start = self.now()
        out, pending = issue()
        return out, _Timed(pending, self, name, mb, start)

    def hidden_fraction(self) -> float:
        """|comm ∩ compute| / |comm|, over the unions of each kind's intervals (0 without comm)."""
        comm = _union([(i.start, i.end) for i in self.intervals if i.kind == "comm"])
        compute = _union([(i.start, i.end) for i in self.intervals if i.kind == "compute"])
        total = sum(e - s for s, e in comm)
        hidden = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in comm for s2, e2 in compute)
        return hidden / total if total else 0.0

    def totals(self) -> dict[str, float]:
        """Seconds of compute, of communication (union), hidden communication, and wall time."""
        comm = _union([(i.start, i.end) for i in self.intervals if i.kind == "comm"])
        comm_s = sum(e - s for s, e in comm)
        frac = self.hidden_fraction()
        return {
            "compute_s": sum(i.end - i.start for i in self.intervals if i.kind == "compute"),
            "comm_s": comm_s,
            "hidden_s": frac * comm_s,
            "hidden_fraction": frac,
            "wall_s": max((i.end for i in self.intervals), default=0.0)
            - min((i.start for i in self.intervals), default=0.0),
        }


class _Timed(Pending):
    """A Pending that, once awaited, adds its collective's interval to a Timeline."""

    def __init__(self, inner: Pending, timeline: Timeline, name: str, mb: int, start: float):
        super().__init__(inner.works)
        self.inner, self.timeline, self.name, self.mb, self.start = inner, timeline, name, mb, start
        self.ends: list[float] = []
        for work in inner.works:
            work.get_future().then(lambda _: self.ends.append(timeline.now()))

    def wait(self) -> None:
        if self.done:
            return
        self.inner.wait()
        # the callback runs once its thread gets the GIL, so it can lag the completion; the
        # return of wait() is another upper bound: keep the earlier of the two
        end = self.timeline.now()
        if len(self.ends) == len(self.works):
            end = min(end, max(self.ends))
        self.timeline.intervals.append(Interval("comm", self.name, self.mb, self.start, end))
        self.done = True


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def plot_timeline(timelines: list[list[Interval]], title: str = "", ax=None, legend: bool = True):
    """One row per rank: compute above (by op), communication below (by collective); returns
    the matplotlib Figure (no pyplot: the caller's backend is left alone).

    Each kind of op has its own colour of the course palette (compute in orange, green and
    purple tones, the three collectives in grey, blue and vermilion), micro-batch 1 is outlined,
    and each kind is one ``broken_barh`` collection per row. The legend (``legend=True``) sits
    below the axes, under the x-label."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..viz.style import DPI

    colors = {
        "plan": "#F0E442",
        "shared": "#E69F00",
        "experts": "#009E73",
        "finish": "#CC79A7",
        "layout": "#999999",
        "dispatch": "#0072B2",
        "combine": "#D55E00",
    }
    if ax is None:
        fig = Figure(figsize=(10, 0.7 * len(timelines) + 1.6), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    names = {iv.name for intervals in timelines for iv in intervals}
    colors.update({name: "#BBBBBB" for name in sorted(names - set(colors))})
    for r, intervals in enumerate(timelines):
        for kind in ("compute", "comm"):
            y = r - 0.4 if kind == "compute" else r + 0.02
            for name in colors:
                for mb in (0, 1):
                    spans = [
                        (iv.start * 1e3, (iv.end - iv.start) * 1e3)
                        for iv in intervals
                        if iv.kind == kind and iv.name == name and iv.mb == mb
                    ]
                    if spans:
                        ax.broken_barh(
                            spans,
                            (y, 0.36),
                            facecolors=colors[name],
                            edgecolors="black" if mb else "none",
                            linewidth=0.8,
                        )
    ax.set_yticks(range(len(timelines)), [f"rank {r}" for r in range(len(timelines))])
    ax.set_ylim(len(timelines) - 0.5, -0.5)
    ax.set_xlabel("ms (upper half of a row: compute; lower half: communication)")
    ax.set_title(title or "two-micro-batch overlap (micro-batch 1 outlined)", fontsize=10)
    if legend:
        ax.legend(
            handles=[Patch(facecolor=c, label=n) for n, c in colors.items()],
            ncol=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.28),
        )
    return fig
