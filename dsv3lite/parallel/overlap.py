"""Two-micro-batch overlap of expert-parallel communication with computation (§3.2.2, §3.4).

An MoE layer under expert parallelism alternates compute (attention, experts) with two
all-to-alls (dispatch, combine) during which a rank has nothing to do but wait. Splitting the
batch into two micro-batches gives it something: while micro-batch 0's tokens travel, compute
micro-batch 1's attention; while 1's travel, compute 0's experts; and so on:

    compute:  attn0  attn1  shared0  experts0  shared1  experts1  finish0  finish1
    comm:        layout0   dispatch0  dispatch1  combine0       combine1

The collectives are started with ``async_op=True`` (gloo runs them on its own threads; NCCL on
its own CUDA stream, concurrently with the compute stream) and awaited just before their
result is needed. The result equals the non-overlapped layer exactly: same ops, other order.

``Timeline`` records, per rank, the wall-clock interval of every compute op and every
collective (from its start to its completion: a callback on the work's future, or the return of
``wait`` if that came first), and reports the fraction of communication time during which the
rank was computing. It is a host-clock instrument: on a GPU kernels run asynchronously to the
host, so use the CUDA profiler there; ``measure_overlap`` times GPUs end to end only.

On a CPU, gloo's transfers are memory copies and loopback TCP run by the same cores that
compute, and its threads compete with the compute for them: the overlap hides waiting (for a
slower rank, for a message in flight), not that work. ``python -m dsv3lite bench comm``
measures how much it hides.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from ..config import preset
from ..fp8 import BLOCK
from ..model.block import DecoderLayer
from ..model.moe import MoE
from ..model.rope import RotaryEmbedding
from .expert_parallel import ExpertParallelMoE, Pending
from .pipeline import causal_inputs


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


def _require_moe(layer: DecoderLayer) -> None:
    if not isinstance(layer.mlp, MoE):
        raise ValueError(f"layer {layer.layer_idx} has a dense FFN; the overlap needs an MoE layer")


class EPDecoderLayer(nn.Module):
    """A DecoderLayer whose MoE is expert-parallel, runnable with or without the overlap."""

    def __init__(self, layer: DecoderLayer, moe: ExpertParallelMoE | None) -> None:
        super().__init__()
        _require_moe(layer)
        self.self_attn = layer.self_attn
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.moe = moe

    @classmethod
    def from_layer(
        cls, layer: DecoderLayer, group: dist.ProcessGroup | None = None, fp8_dispatch: bool = False
    ) -> EPDecoderLayer:
        """Share ``layer``'s attention and norms; shard its MoE over ``group``."""
        _require_moe(layer)
        return cls(layer, ExpertParallelMoE.from_moe(layer.mlp, group, fp8_dispatch))

    def _attend(self, x, cos, sin, mask):
        """Attention and the residual, the FFN's input u, and its routing."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        u = self.post_attention_layernorm(h).reshape(-1, h.shape[-1])
        return h, u, self.moe.gate(u)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        overlap: bool = True,
        timeline: Timeline | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden] with B >= 2, split into two micro-batches along the batch; with
        ``overlap`` the schedule of the module docstring, else one micro-batch after the other
        with every collective awaited at once."""
        if x.shape[0] < 2:
            raise ValueError(
                f"two-micro-batch overlap splits the batch: need batch >= 2, got {x.shape[0]}"
            )
        tl = timeline or Timeline()
        mbs = [dict(x=xi) for xi in x.tensor_split(2, dim=0)]
        for step, i in _OVERLAPPED if overlap else _SEQUENTIAL:
            getattr(self, f"_{step}")(mbs[i], i, (cos, sin, mask), tl, not overlap)
        return torch.cat([mb["y"] for mb in mbs])

    # One step of one micro-batch each. A step that starts a collective leaves its pending in
    # mb["pending"] for the next step to await — or, with ``block``, awaits it at once.
    def _issue(self, mb, name, i, tl, block, issue):
        out, mb["pending"] = tl.comm(name, i, issue)
        if block:
            mb["pending"].wait()
        return out

    def _attention(self, mb, i, rope, tl, block):
        with tl.compute("attention", i):
            mb["h"], mb["u"], mb["routing"] = self._attend(mb["x"], *rope)
        issue = partial(self.moe.exchange_counts, mb["routing"])
        mb["counts"] = self._issue(mb, "layout", i, tl, block, issue)

    def _dispatch(self, mb, i, rope, tl, block):
        mb["pending"].wait()
        with tl.compute("plan", i):
            mb["plan"] = self.moe.plan(mb["routing"], mb["counts"])
        issue = partial(self.moe.dispatch, mb["u"], mb["plan"])
        mb["received"] = self._issue(mb, "dispatch", i, tl, block, issue)

    def _experts(self, mb, i, rope, tl, block):
        mb["pending"].wait()
        with tl.compute("experts", i):
            out = self.moe.compute(mb["received"], mb["plan"])
        issue = partial(self.moe.combine, out, mb["plan"])
        mb["back"] = self._issue(mb, "combine", i, tl, block, issue)

    def _shared(self, mb, i, rope, tl, block):
        with tl.compute("shared", i):
            shared = self.moe.shared_experts
            mb["shared"] = shared(mb["u"]) if shared is not None else 0.0

    def _finish(self, mb, i, rope, tl, block):
        mb["pending"].wait()
        with tl.compute("finish", i):
            routed = self.moe.weighted_sum(mb["back"], mb["plan"], mb["u"].shape[0])
            ffn = routed.to(mb["u"].dtype) + mb["shared"]
            mb["y"] = mb["h"] + ffn.view_as(mb["h"])


_OVERLAPPED = [
    ("attention", 0),
    ("attention", 1),  # hides layout 0
    ("dispatch", 0),
    ("shared", 0),  # hides dispatch 0, layout 1
    ("dispatch", 1),
    ("experts", 0),  # hides dispatch 1
    ("shared", 1),  # hides combine 0, dispatch 1
    ("experts", 1),  # hides combine 0
    ("finish", 0),  # hides combine 1
    ("finish", 1),
]
_SEQUENTIAL = [
    (step, i) for i in (0, 1) for step in ("attention", "dispatch", "experts", "shared", "finish")
]


def plot_timeline(timelines: list[list[Interval]], title: str = "", ax=None):
    """One row per rank: compute above (by op), communication below (by collective); returns
    the matplotlib Figure (no pyplot: the caller's backend is left alone)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colors = {
        "attention": "#f0b23a",
        "experts": "#7fd65a",
        "shared": "#b6e89c",
        "plan": "#e0e0e0",
        "finish": "#c9a0dc",
        "layout": "#999999",
        "dispatch": "#3a7dd8",
        "combine": "#d84a3a",
    }
    if ax is None:
        fig = Figure(figsize=(9, 0.7 * len(timelines) + 1.2), dpi=85)
        ax = fig.add_subplot()
    fig = ax.figure
    for r, intervals in enumerate(timelines):
        for iv in intervals:
            y = r - 0.4 if iv.kind == "compute" else r + 0.02
            ax.broken_barh(
                [(iv.start * 1e3, (iv.end - iv.start) * 1e3)],
                (y, 0.36),
                facecolors=colors.get(iv.name, "#cccccc"),
                edgecolors="black" if iv.mb else "none",
                linewidth=0.6,
                alpha=0.9,
            )
    ax.set_yticks(range(len(timelines)), [f"rank {r}" for r in range(len(timelines))])
    ax.set_ylim(len(timelines) - 0.5, -0.5)
    ax.set_xlabel("ms (upper half of a row: compute; lower half: communication)")
    ax.set_title(title or "two-micro-batch overlap (micro-batch 1 outlined)", fontsize=9)
    ax.legend(
        handles=[Patch(facecolor=c, label=n) for n, c in colors.items()],
        ncol=7,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.3),
    )
    return fig


def measure_overlap(
    batch: int = 4,
    seq_len: int = 64,
    repeats: int = 5,
    seed: int = 0,
    fp8_dispatch: bool = False,
    preset_name: str = "tiny",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Run on every rank of a process group (e.g. via ``launch``): one MoE decoder layer of a
    preset, expert-parallel over all ranks, forward with and without the overlap.

    Returns this rank's numbers: each mode's error against the single-process layer, its median
    wall time, its median hidden fraction of communication, the median duration of each kind
    of collective, and its last repeat's timeline; plus the bytes this rank dispatches. Each
    repeat starts after a barrier, so that the ranks' timelines line up.
    """
    config = preset(preset_name)
    rank = dist.get_rank()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(seed)
    layer = DecoderLayer(config, config.first_k_dense_replace).to(device)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            )
    layer = layer.to(dtype)
    x = torch.randn(dist.get_world_size() * batch, seq_len, config.hidden_size, device=device)
    x = x[rank * batch : (rank + 1) * batch].to(dtype)
    cos, sin, mask = causal_inputs(RotaryEmbedding(config).to(device), seq_len, device)
    ep_layer = EPDecoderLayer.from_layer(layer, fp8_dispatch=fp8_dispatch)
    pairs = batch * seq_len * config.num_experts_per_tok
    row_bytes = config.hidden_size * (1 + 4 / BLOCK if fp8_dispatch else x.element_size())
    result: dict = {"rank": rank, "tokens": batch * seq_len, "dispatch_bytes": pairs * row_bytes}
    with torch.no_grad():
        reference, _ = layer(x, cos, sin, mask)
        for mode in ("sequential", "overlapped"):
            walls, hidden, comm = [], [], {}
            for i in range(repeats + 1):  # the first is a warm-up
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                tl = Timeline()
                y = ep_layer(x, cos, sin, mask, overlap=mode == "overlapped", timeline=tl)
                if cuda:
                    torch.cuda.synchronize()
                if i:
                    walls.append(tl.now())
                    hidden.append(tl.hidden_fraction())
                    for iv in tl.intervals:
                        if iv.kind == "comm":
                            comm.setdefault(iv.name, []).append(iv.end - iv.start)
            result[mode] = {
                "error": ((y - reference).float().norm() / reference.float().norm()).item(),
                "wall_ms": statistics.median(walls) * 1e3,
                "hidden_fraction": statistics.median(hidden),
                "comm_ms": {k: statistics.median(v) * 1e3 for k, v in comm.items()},
                "timeline": tl.intervals,
            }
    return result
