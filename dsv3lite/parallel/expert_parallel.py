"""Expert parallelism (report §3.2.2): routed experts sharded over ranks, tokens moved by all-to-all.

With EP ranks, rank r owns routed experts [r·N_r/EP, (r+1)·N_r/EP); the gate and the shared
experts are replicated. Every rank routes its own tokens, then:

1. **layout** — per-expert counts go to every expert's owner (one small all_to_all_single), so
   each rank learns how many rows it will receive from whom, for which of its experts, and
   every rank sorts its pairs by expert — hence by destination;
2. **dispatch** — each (token, expert) pair's hidden state goes to the expert's owner
   (all_to_all_single with uneven splits; optionally FP8: 1×128 tiles + scales, dequantized on
   arrival, as the report dispatches in FP8);
3. **expert compute** — received rows sorted by local expert, one contiguous slice per expert
   (the ``Experts`` module, as on one process);
4. **combine** — the outputs travel back by the reverse all-to-all (full precision), and the
   token's home rank forms Σ_i g_{i,t} FFN_i(u_t) (eq. 12) in fp32, plus the shared experts.

The MoE layer is the model's own: ``shard_moe`` cuts its stacked experts to this rank's slice
and plugs an ``ExpertParallelDispatcher`` in place of its ``LocalDispatcher`` (the model does
not know about process groups). The sort and the weighted combine are the ones the local path
uses (``moe.sort_pairs``, ``moe.gather``, ``moe.combine``), and the per-expert counts are the gate's load.

The all-to-all is differentiable: its backward is the reverse all-to-all of the gradients, so
``loss.backward()`` on every rank trains the sharded experts exactly as one process would.

Node-limited routing: the gate keeps ``topk_group`` of ``n_group`` expert groups per token.
When each group lives on one rank (EP divides n_group; n_group == EP is the report's one group
per node), a token reaches at most ``topk_group`` ranks — the report's M = 4 nodes, which bounds
its cross-node traffic. (DeepEP also sends a token once per node and fans it out over NVLink;
here each (token, expert) pair travels on its own, the simpler scheme.)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..fp8 import FP8, act_dequant, act_quant
from ..model.experts import Experts
from ..model.moe import MoE, Pairs, Routing, combine, gather, sort_pairs
from .launch import check_same_on_all_ranks
from .overlap import OVERLAPPED, SEQUENTIAL, Pending

if TYPE_CHECKING:
    from .overlap import Timeline


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward sends the gradients back the same way.

    Rows [sum(in_splits[:d]), sum(in_splits[:d+1])) of x go to rank d; the output holds what
    each rank sent here, in rank order. The exchange is started asynchronously and recorded in
    ``box`` as a Pending: the output may be read only after its ``wait()``. With ``fp8`` the
    rows travel as e4m3 bytes plus one fp32 scale per 128 channels; gradients travel in full
    precision (quantization is treated as the identity in the backward, straight-through).
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, fp8, box):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        n_out = sum(out_splits)
        out = x.new_empty((n_out, x.shape[1]))
        if not fp8:
            work = dist.all_to_all_single(
                out, x.contiguous(), out_splits, in_splits, group=group, async_op=True
            )
            box.append(Pending([work]))
            return out
        q, scale = act_quant(x)  # 1×128 tiles: one scale per token per 128 channels
        q_out = torch.empty((n_out, q.shape[1]), dtype=torch.uint8, device=x.device)
        s_out = scale.new_empty((n_out, scale.shape[1]))
        works = [  # bytes: not every backend knows float8 dtypes
            dist.all_to_all_single(
                q_out, q.view(torch.uint8), out_splits, in_splits, group=group, async_op=True
            ),
            dist.all_to_all_single(
                s_out, scale.contiguous(), out_splits, in_splits, group=group, async_op=True
            ),
        ]

        def finish() -> None:
            out.copy_(act_dequant(q_out.view(FP8), s_out))

        box.append(Pending(works, finish))
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_x = grad.new_empty((sum(in_splits), grad.shape[1]))
        dist.all_to_all_single(grad_x, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_x, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None = None,
    fp8: bool = False,
) -> tuple[torch.Tensor, Pending]:
    """Differentiable uneven all-to-all of the rows of x; returns (output, pending). Read the
    output only after ``pending.wait()`` — in between, the caller may compute something else."""
    box: list[Pending] = []
    out = _AllToAll.apply(x, out_splits, in_splits, group, fp8, box)
    return out, box[0]


@dataclass
class DispatchPlan:
    """Where each (token, expert) pair goes and comes back; made by ``plan``."""

    pairs: Pairs  # this rank's pairs sorted by expert, hence by destination rank
    send_splits: list[int]  # pairs sent to each rank
    recv_splits: list[int]  # rows received from each rank
    recv_counts: torch.Tensor  # [EP, local experts]: rows from rank s for local expert j
    recv_order: torch.Tensor  # received rows sorted by local expert


class ExpertParallelDispatcher:
    """The routed part of an MoE layer with its experts sharded over the ranks of ``group``
    (default: all). Plugged into a ``MoE`` by ``shard_moe`` (its ``Experts`` then hold only
    this rank's slice), it is called as the MoE's ``LocalDispatcher`` is, on this rank's tokens,
    and returns what the MoE would on them; the backward gives each rank its experts' gradients
    from every rank's tokens (the gate's and shared experts' are this rank's share, to be
    all-reduced like any data-parallel gradient: ``reduce_gradients`` does both).

    ``fp8_dispatch`` sends the dispatched rows in E4M3 (1×128 tiles); ``overlap`` splits the
    tokens into two micro-batches and runs ``overlap.OVERLAPPED``, else every collective is
    awaited at once (``SEQUENTIAL``). Set ``timeline`` to a ``Timeline`` to record the ops.
    """

    def __init__(
        self,
        config: ModelConfig,
        group: dist.ProcessGroup | None = None,
        fp8_dispatch: bool = False,
        overlap: bool = False,
    ) -> None:
        self.group, self.fp8_dispatch, self.overlap = group, fp8_dispatch, overlap
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        n = config.n_routed_experts
        if n % self.ep_size:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"ModelConfig.n_routed_experts ({n}) must be divisible by the expert-parallel "
                f"size ({self.ep_size}); allowed EP sizes: {divisors}"
            )
        check_same_on_all_ranks(config.to_dict(), "ModelConfig", group)
        self.n_local = n // self.ep_size
        self.first_expert = self.ep_rank * self.n_local
        self.timeline: Timeline | None = None

    # ------------------------------------------------------------------ the four steps
    def exchange_counts(self, routing: Routing) -> tuple[torch.Tensor, Pending]:
        """Step 1a (layout): send every expert's owner how many of our pairs chose that expert
        (the gate's load). Returns [EP, local experts] received counts (rows from rank s for
        local expert j), to be read after the pending's ``wait()``."""
        recv_counts = torch.empty_like(routing.load)
        work = dist.all_to_all_single(recv_counts, routing.load, group=self.group, async_op=True)
        return recv_counts.view(self.ep_size, self.n_local), Pending([work])

    def plan(self, routing: Routing, recv_counts: torch.Tensor) -> DispatchPlan:
        """Step 1b: sort our pairs by expert (hence by owner), and order the rows to come."""
        pairs = sort_pairs(routing)
        # received rows arrive by source rank, each source's rows sorted by expert
        local_expert = torch.arange(self.n_local, device=recv_counts.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_expert, recv_counts.flatten())
        return DispatchPlan(
            pairs=pairs,
            send_splits=pairs.counts.view(self.ep_size, self.n_local).sum(1).tolist(),
            recv_splits=recv_counts.sum(1).tolist(),
            recv_counts=recv_counts,
            recv_order=row_expert.argsort(stable=True),
        )

    def dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, Pending]:
        """Step 2: send each pair's hidden state to its expert's owner (started, not awaited)."""
        rows = gather(x, plan.pairs)
        return all_to_all(rows, plan.recv_splits, plan.send_splits, self.group, self.fp8_dispatch)

    def compute(self, experts: Experts, received: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Step 3: the local experts on the received rows, grouped by expert (one contiguous
        slice each, as on one process), then put back in arrival order."""
        out = experts(received.index_select(0, plan.recv_order), plan.recv_counts.sum(0))
        return out.index_select(0, plan.recv_order.argsort())  # index_select: see moe.gather

    def send_back(self, out: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, Pending]:
        """Step 4a: send expert outputs back to the tokens' ranks (full precision; started)."""
        return all_to_all(out, plan.send_splits, plan.recv_splits, self.group)

    # Step 4b is ``moe.combine``: Σ_i g_{i,t} FFN_i(u_t) (eq. 12) on the token's home rank.

    # ------------------------------------------------------------------ the schedule
    def __call__(
        self, experts: Experts, shared: nn.Module | None, x: torch.Tensor, routing: Routing
    ) -> torch.Tensor:
        """The routed and shared experts' output for this rank's tokens x [N, hidden]."""
        if self.overlap and x.shape[0] >= 2:
            half = x.shape[0] // 2
            mbs = [dict(x=x[:half], routing=_rows(routing, 0, half))]
            mbs.append(dict(x=x[half:], routing=_rows(routing, half, x.shape[0], mbs[0])))
            schedule, block = OVERLAPPED, False
        else:
            mbs, schedule, block = [dict(x=x, routing=routing)], SEQUENTIAL, True
        for step, i in schedule:
            getattr(self, f"_{step}")(mbs[i], i, experts, shared, block)
        return torch.cat([mb["y"] for mb in mbs])

    # One step of one micro-batch each. A step that starts a collective leaves its pending in
    # mb["pending"] for the next step to await — or, with ``block``, awaits it at once.
    def _layout(self, mb, i, experts, shared, block):
        mb["counts"] = self._issue("layout", i, block, mb, self.exchange_counts, mb["routing"])

    def _dispatch(self, mb, i, experts, shared, block):
        mb["pending"].wait()
        with self._compute("plan", i):
            mb["plan"] = self.plan(mb["routing"], mb["counts"])
        mb["received"] = self._issue("dispatch", i, block, mb, self.dispatch, mb["x"], mb["plan"])

    def _shared(self, mb, i, experts, shared, block):
        with self._compute("shared", i):
            mb["shared"] = shared(mb["x"]) if shared is not None else None

    def _experts(self, mb, i, experts, shared, block):
        mb["pending"].wait()
        with self._compute("experts", i):
            out = self.compute(experts, mb["received"], mb["plan"])
        mb["back"] = self._issue("combine", i, block, mb, self.send_back, out, mb["plan"])

    def _finish(self, mb, i, experts, shared, block):
        mb["pending"].wait()
        with self._compute("finish", i):
            x = mb["x"]
            y = combine(mb["back"], mb["plan"].pairs, x.shape[0]).to(x.dtype)
            mb["y"] = y if mb["shared"] is None else y + mb["shared"]

    def _compute(self, name: str, i: int):
        return self.timeline.compute(name, i) if self.timeline else nullcontext()

    def _issue(self, name, i, block, mb, start, *args):
        """Start a collective with ``start(*args)`` -> (output, Pending); return the output."""
        if self.timeline is None:
            out, mb["pending"] = start(*args)
        else:
            out, mb["pending"] = self.timeline.comm(name, i, lambda: start(*args))
        if block:
            mb["pending"].wait()
        return out

    def ranks_reached(self, routing: Routing) -> torch.Tensor:
        """[N] how many distinct ranks each token's experts live on (node-limited routing)."""
        owner = routing.indices // self.n_local
        hit = torch.zeros(owner.shape[0], self.ep_size, dtype=torch.bool, device=owner.device)
        return hit.scatter_(1, owner, True).sum(1)


def _rows(routing: Routing, start: int, end: int, before: dict | None = None) -> Routing:
    """The Routing of tokens start:end. The load of the first micro-batch is counted; the
    second's is the rest of the gate's (``before``: the first micro-batch)."""
    indices = routing.indices[start:end]
    if before is None:
        load = torch.zeros_like(routing.load).index_add_(
            0, indices.flatten(), torch.ones_like(indices.flatten())
        )
    else:
        load = routing.load - before["routing"].load
    return Routing(
        weights=routing.weights[start:end],
        indices=indices,
        scores=routing.scores[start:end],
        load=load,
    )


def shard_moe(
    moe: MoE,
    group: dist.ProcessGroup | None = None,
    fp8_dispatch: bool = False,
    overlap: bool = False,
) -> ExpertParallelDispatcher:
    """Make ``moe`` this rank's expert-parallel shard, in place: its ``Experts`` keep only this
    rank's slice of the stacked weights (experts first_expert … first_expert + n_local - 1),
    its dispatcher becomes an ``ExpertParallelDispatcher``; the gate and shared experts stay
    replicated. Every rank must hold the same weights first (same seed or checkpoint)."""
    dispatcher = ExpertParallelDispatcher(moe.config, group, fp8_dispatch, overlap)
    mine = slice(dispatcher.first_expert, dispatcher.first_expert + dispatcher.n_local)
    experts = moe.experts
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[mine].clone())
    experts.down_proj = nn.Parameter(experts.down_proj.detach()[mine].clone())
    moe.dispatcher = dispatcher
    return dispatcher


def shard_moe_layers(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    fp8_dispatch: bool = False,
    overlap: bool = False,
) -> list[MoE]:
    """``shard_moe`` every MoE inside ``model``; returns them. The rest stays replicated."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in moes:
        shard_moe(moe, group, fp8_dispatch, overlap)
    return moes


def sharded_experts(model: nn.Module) -> dict[str, ExpertParallelDispatcher]:
    """The name of every parameter that holds a slice of sharded experts, and its dispatcher."""
    return {
        f"{name}.experts.{p}": moe.dispatcher
        for name, moe in model.named_modules()
        if isinstance(moe, MoE) and isinstance(moe.dispatcher, ExpertParallelDispatcher)
        for p, _ in moe.experts.named_parameters()
    }


def reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """After ``backward`` of each rank's mean loss, make the gradients those of the mean loss
    over all ranks' tokens (the expert-parallel group is also the data-parallel group).

    Replicated parameters (attention, gate, shared experts, embeddings ...) hold each rank's
    share: they are averaged with one all-reduce. A sharded expert already received, through
    the all-to-all's backward, the gradients of *every* rank's loss — a sum of EP means — so it
    is divided by EP instead.
    """
    world = dist.get_world_size(group)
    sharded = sharded_experts(model)
    replicated = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # unused here, maybe not elsewhere: every rank must send the same
            p.grad = torch.zeros_like(p)
        if name in sharded:
            p.grad.div_(world)
        else:
            replicated.append(p)
    if replicated:
        flat = torch.cat([p.grad.flatten() for p in replicated])
        dist.all_reduce(flat, group=group)  # SUM: every backend has it (gloo has no AVG)
        flat /= world
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated])):
            p.grad.copy_(g.view_as(p))
