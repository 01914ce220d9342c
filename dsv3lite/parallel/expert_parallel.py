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
   (as ``MoE.routed`` does on one process);
4. **combine** — the outputs travel back by the reverse all-to-all (full precision), and the
   token's home rank forms Σ_i g_{i,t} FFN_i(u_t) (eq. 12) in fp32, plus the shared experts.

The all-to-all is differentiable: its backward is the reverse all-to-all of the gradients, so
``loss.backward()`` on every rank trains the sharded experts exactly as one process would.

Node-limited routing: the gate keeps ``topk_group`` of ``n_group`` expert groups per token.
When each group lives on one rank (EP divides n_group; n_group == EP is the report's one group
per node), a token reaches at most ``topk_group`` ranks — the report's M = 4 nodes, which bounds
its cross-node traffic. (DeepEP also sends a token once per node and fans it out over NVLink;
here each (token, expert) pair travels on its own, the simpler scheme.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig, preset
from ..fp8 import FP8, act_dequant, act_quant
from ..model.moe import MLP, Gate, MoE, Routing
from .launch import check_same_on_all_ranks


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
    """Where each (token, expert) pair goes and comes back; made by ``ExpertParallelMoE.plan``.

    Pairs are numbered token-major (pair p = token p // K_r, its (p % K_r)-th expert).
    """

    order: torch.Tensor  # [N·K_r] pairs sorted by expert, hence by destination rank
    token: torch.Tensor  # [N·K_r] token of each sorted pair
    weight: torch.Tensor  # [N·K_r] g_{i,t} of each sorted pair (fp32, with grad)
    send_splits: list[int]  # pairs sent to each rank
    recv_splits: list[int]  # rows received from each rank
    recv_counts: torch.Tensor  # [EP, local experts]: rows from rank s for local expert j
    recv_order: torch.Tensor  # received rows sorted by local expert


class ExpertParallelMoE(nn.Module):
    """DeepSeekMoE with its routed experts sharded over the ranks of ``group`` (default: all).

    Build it from a single-process ``MoE`` with ``from_moe`` (each rank keeps its slice of the
    experts, a copy of the gate and of the shared experts); then ``forward`` on each rank's
    tokens equals the MoE's forward on those tokens, and backward gives each rank its experts'
    gradients from every rank's tokens (the gate's and shared experts' are this rank's share,
    to be all-reduced like any data-parallel gradient: ``reduce_gradients`` does both). For a
    whole model, ``shard_moe_layers`` swaps each MoE for its shard.
    """

    def __init__(
        self,
        config: ModelConfig,
        group: dist.ProcessGroup | None = None,
        fp8_dispatch: bool = False,
    ) -> None:
        super().__init__()
        self.config, self.group, self.fp8_dispatch = config, group, fp8_dispatch
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if config.n_routed_experts % self.ep_size:
            divisors = [
                d for d in range(1, config.n_routed_experts + 1) if config.n_routed_experts % d == 0
            ]
            raise ValueError(
                f"ModelConfig.n_routed_experts ({config.n_routed_experts}) must be divisible by "
                f"the expert-parallel size ({self.ep_size}); allowed EP sizes: {divisors}"
            )
        check_same_on_all_ranks(config.to_dict(), "ModelConfig", group)
        self.n_local = config.n_routed_experts // self.ep_size
        self.first_expert = self.ep_rank * self.n_local
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(self.n_local)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    @classmethod
    def from_moe(
        cls, moe: MoE, group: dist.ProcessGroup | None = None, fp8_dispatch: bool = False
    ) -> ExpertParallelMoE:
        """This rank's share of ``moe``: copies of the gate and shared experts and of its slice
        of experts, each on the device and in the dtype of its source."""
        ep = cls(moe.config, group, fp8_dispatch)
        pairs = [(ep.gate, moe.gate), (ep.shared_experts, moe.shared_experts)]
        pairs += [(e, moe.experts[ep.first_expert + j]) for j, e in enumerate(ep.experts)]
        for mine, theirs in pairs:
            if mine is not None:
                copies = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
                mine.load_state_dict(copies, assign=True)
        return ep

    # ------------------------------------------------------------------ the four steps
    def exchange_counts(self, routing: Routing) -> tuple[torch.Tensor, Pending]:
        """Step 1a (layout): send every expert's owner how many of our pairs chose that expert.
        Returns [EP, local experts] received counts (rows from rank s for local expert j), to be
        read after the pending's ``wait()``."""
        per_expert = torch.bincount(
            routing.indices.flatten(), minlength=self.config.n_routed_experts
        )
        recv_counts = torch.empty_like(per_expert)
        work = dist.all_to_all_single(recv_counts, per_expert, group=self.group, async_op=True)
        return recv_counts.view(self.ep_size, self.n_local), Pending([work])

    def plan(self, routing: Routing, recv_counts: torch.Tensor) -> DispatchPlan:
        """Step 1b: sort our pairs by expert (hence by owner), and order the rows to come."""
        k = routing.indices.shape[1]
        flat = routing.indices.flatten()
        order = flat.argsort(stable=True)
        per_expert = torch.bincount(flat, minlength=self.config.n_routed_experts)
        # received rows arrive by source rank, each source's rows sorted by expert
        local_expert = torch.arange(self.n_local, device=flat.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_expert, recv_counts.flatten())
        return DispatchPlan(
            order=order,
            token=order // k,
            weight=routing.weights.flatten()[order],
            send_splits=per_expert.view(self.ep_size, self.n_local).sum(1).tolist(),
            recv_splits=recv_counts.sum(1).tolist(),
            recv_counts=recv_counts,
            recv_order=row_expert.argsort(stable=True),
        )

    def dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, Pending]:
        """Step 2: send each pair's hidden state to its expert's owner (started, not awaited)."""
        return all_to_all(
            x[plan.token], plan.recv_splits, plan.send_splits, self.group, self.fp8_dispatch
        )

    def compute(self, received: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Step 3: run each local expert once on its contiguous slice of the received rows."""
        rows = received[plan.recv_order]
        pieces, start = [], 0
        for expert, n in zip(self.experts, plan.recv_counts.sum(0).tolist()):
            if n:
                pieces.append(expert(rows[start : start + n]))
            start += n
        out = torch.cat(pieces) if pieces else rows  # rows: keeps the graph when nothing came
        return out[plan.recv_order.argsort()]  # back to arrival order

    def combine(self, out: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, Pending]:
        """Step 4a: send expert outputs back to the tokens' ranks (full precision; started)."""
        return all_to_all(out, plan.send_splits, plan.recv_splits, self.group)

    def weighted_sum(self, back: torch.Tensor, plan: DispatchPlan, n_tokens: int) -> torch.Tensor:
        """Step 4b: Σ_i g_{i,t} FFN_i(u_t) (eq. 12) in fp32, in the pairs' sorted order."""
        acc = torch.promote_types(back.dtype, torch.float32)
        y = back.new_zeros((n_tokens, back.shape[1]), dtype=acc)
        return y.index_add_(0, plan.token, back.to(acc) * plan.weight[:, None].to(acc))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        recv_counts, pending = self.exchange_counts(routing)
        pending.wait()
        plan = self.plan(routing, recv_counts)
        received, pending = self.dispatch(x, plan)
        pending.wait()
        back, pending = self.combine(self.compute(received, plan), plan)
        pending.wait()
        y = self.weighted_sum(back, plan, x.shape[0]).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), routing

    def ranks_reached(self, routing: Routing) -> torch.Tensor:
        """[N] how many distinct ranks each token's experts live on (node-limited routing)."""
        owner = routing.indices // self.n_local
        hit = torch.zeros(owner.shape[0], self.ep_size, dtype=torch.bool, device=owner.device)
        return hit.scatter_(1, owner, True).sum(1)


def shard_moe_layers(
    model: nn.Module, group: dist.ProcessGroup | None = None, fp8_dispatch: bool = False
) -> list[ExpertParallelMoE]:
    """Replace every ``MoE`` inside ``model`` by this rank's ``ExpertParallelMoE`` shard, in
    place (every rank must hold the same weights first, e.g. the same seed or checkpoint);
    returns the shards. The rest of the model stays replicated."""
    shards = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoE):
                shard = ExpertParallelMoE.from_moe(child, group, fp8_dispatch)
                setattr(module, name, shard)
                shards.append(shard)
    return shards


def reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """After ``backward`` of each rank's mean loss, make the gradients those of the mean loss
    over all ranks' tokens (the expert-parallel group is also the data-parallel group).

    Replicated parameters (attention, gate, shared experts, embeddings ...) hold each rank's
    share: they are averaged with one all-reduce. A sharded expert already received, through
    the all-to-all's backward, the gradients of *every* rank's loss — a sum of EP means — so it
    is divided by EP instead.
    """
    world = dist.get_world_size(group)
    sharded = {
        id(p)
        for m in model.modules()
        if isinstance(m, ExpertParallelMoE)
        for p in m.experts.parameters()
    }
    replicated = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:  # unused here, maybe not elsewhere: every rank must send the same
            p.grad = torch.zeros_like(p)
        if id(p) in sharded:
            p.grad.div_(world)
        else:
            replicated.append(p)
    if replicated:
        flat = torch.cat([p.grad.flatten() for p in replicated])
        dist.all_reduce(flat, group=group)  # SUM: every backend has it (gloo has no AVG)
        flat /= world
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated])):
            p.grad.copy_(g.view_as(p))


def ep_check(tokens_per_rank: int = 32, seed: int = 0, fp8_dispatch: bool = False) -> dict:
    """Run on every rank (e.g. via ``launch``): the ``tiny`` preset's MoE, sharded over all
    ranks, forward and backward on this rank's tokens — against the same MoE run here on every
    rank's tokens. Returns this rank's plan (what it sent and received) and its errors."""
    config = preset("tiny")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(world * tokens_per_rank, config.hidden_size)
    probe = torch.randn_like(x)
    ref, _ = moe(x)
    (ref * probe).sum().backward()
    mine = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)

    ep = ExpertParallelMoE.from_moe(moe, fp8_dispatch=fp8_dispatch)
    routing = ep.gate(x[mine])
    recv_counts, pending = ep.exchange_counts(routing)
    pending.wait()
    plan = ep.plan(routing, recv_counts)
    y, _ = ep(x[mine])
    (y * probe[mine]).sum().backward()
    theirs = moe.experts[ep.first_expert : ep.first_expert + ep.n_local]
    return {
        "experts": list(range(ep.first_expert, ep.first_expert + ep.n_local)),
        "send_splits": plan.send_splits,
        "recv_splits": plan.recv_splits,
        "recv_counts": plan.recv_counts.tolist(),
        "max_ranks_per_token": int(ep.ranks_reached(routing).max()),
        "output_error": _rel_err(y.detach(), ref.detach()[mine]),
        "expert_grad_error": max(
            _rel_err(p.grad, q.grad) for p, q in zip(ep.experts.parameters(), theirs.parameters())
        ),
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
