"""DeepSeekMoE (report §2.1.2, eqs. 12–16): shared experts plus fine-grained routed experts.

    h'_t = u_t + Σ_{i≤N_s} FFN^(s)_i(u_t) + Σ_{i≤N_r} g_{i,t} FFN^(r)_i(u_t)        (12)
    s_{i,t} = Sigmoid(u_t^T e_i)                                                    (15)
    g'_{i,t} = s_{i,t} if s_{i,t} + b_i ∈ TopK({s_{j,t} + b_j}, K_r) else 0          (16)
    g_{i,t} = g'_{i,t} / Σ_j g'_{j,t}                                                (13)

The bias b_i (``e_score_correction_bias``) only steers *which* experts are chosen; the weights
come from the unbiased s. That is what makes auxiliary-loss-free balancing possible (§2.1.2):
nudging b changes the load without touching the gradient of the language-modelling loss.

Group-limited routing: experts form ``n_group`` groups (one per node in the report's
deployment); a token first keeps the ``topk_group`` groups whose two best biased scores sum
highest, then takes its top-K_r experts inside them. (DeepSeek's inference code scores a group
by its single best score instead when its gate has no bias, as in every config but the 671B
one: ``group_score="max"`` follows it, so such checkpoints route the same here.)

Dropped groups are masked with -inf, as the release's inference code and transformers >= 5.24
do. (transformers 5.0–5.2x masked with 0.0; that differs only when every surviving biased score
is negative — then 0.0 would let experts from dropped groups win. See
tests/test_moe.py::test_dropped_groups_never_win.)

The routed sum runs in three steps, whatever the hardware or the number of processes:
``sort_pairs`` orders the (token, expert) pairs by expert (the gate's load gives each expert's
count, computed once), the ``Experts`` compute every expert on its contiguous rows (a loop, or
one grouped GEMM: ``Experts.impl``), and ``combine`` adds each token's K_r outputs weighted by
g_{i,t}. A ``Dispatcher`` decides where the middle step runs: ``LocalDispatcher`` here, or
``parallel.ExpertParallelDispatcher``, which ships the rows to the ranks owning the experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .experts import Experts


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x)). Dense layers and every expert use it."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    """What the gate decided for N tokens; what balancing and statistics need."""

    weights: torch.Tensor  # [N, K_r] g_{i,t}, fp32, already × routed_scaling_factor
    indices: torch.Tensor  # [N, K_r] chosen expert ids
    scores: torch.Tensor  # [N, N_r] unbiased affinities s_{i,t} (fp32, with grad)
    load: torch.Tensor  # [N_r] how many tokens each expert received (no grad)


class Gate(nn.Module):
    """The router: affinities, bias-steered group-limited top-k, normalised gating weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # A buffer, not a parameter: it is updated by the balancing rule, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, hidden] → Routing. Computed in fp32, as the release keeps the gate in fp32."""
        c = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        biased = scores.detach() + self.e_score_correction_bias.float()
        if c.n_group > 1:
            biased = self._limit_groups(biased)
        indices = biased.topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * c.routed_scaling_factor
        # a scatter, not bincount: bincount reads the max back to the host (a sync per layer);
        # counted in int32, which a compiled GPU graph adds atomically (int64 it cannot: it
        # falls back to a sorting index_put with bound checks, a dozen kernels per layer)
        flat = indices.flatten()
        load = torch.zeros(c.n_routed_experts, dtype=torch.int32, device=flat.device)
        load = load.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).long()
        return Routing(weights=weights, indices=indices, scores=scores, load=load)

    def _limit_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group groups with the highest group score: the sum of a group's top-2
        biased scores, or (``group_score="max"``) its best one."""
        c = self.config
        grouped = biased.view(biased.shape[0], c.n_group, c.n_routed_experts // c.n_group)
        if c.group_score == "max":
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_scores.topk(c.topk_group, dim=-1, sorted=False).indices
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(mask[..., None], float("-inf")).flatten(1)


class MoE(nn.Module):
    """Gate + routed experts + shared experts (eq. 12).

    The routed part goes through ``dispatcher``: a ``LocalDispatcher`` (every expert on this
    process) unless ``dsv3lite.parallel.shard_moe_layers`` plugged in its expert-parallel one.
    Both share ``sort_pairs``, ``gather`` and ``combine``; only where the sorted rows are computed differs.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = Experts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [..., hidden] → (y of the same shape, the Routing of its tokens). The routing is
        returned, not kept on the module, so that balancing reads what this very call decided
        (the model collects it into ``ModelOutput.routing``)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        y = self.dispatcher(self.experts, self.shared_experts, x, routing)
        return y.view(shape), routing


@dataclass
class Pairs:
    """A Routing's (token, expert) pairs sorted by expert, numbered token-major before the sort
    (pair p = token p // K_r, its (p % K_r)-th choice). Expert i owns the sorted rows from
    counts[0] + … + counts[i-1] on, so each expert's rows are one contiguous slice."""

    token: torch.Tensor  # [N·K_r] the token of each sorted pair (stable: by token in an expert)
    weight: torch.Tensor  # [N·K_r] g_{i,t} of each sorted pair (fp32, with grad)
    counts: torch.Tensor  # [N_r] pairs per expert: the gate's load, counted once


def sort_pairs(routing: Routing) -> Pairs:
    """Sort the pairs by expert (on the device: no host sync)."""
    # the narrowest integer that holds an expert id: a GPU radix sort makes one pass per byte
    # of the key, so int16 ids sort in 2 passes where topk's int64 would take 8
    n_experts = routing.load.numel()
    key = routing.indices.flatten().to(torch.int16 if n_experts <= 2**15 else torch.int32)
    order = key.argsort(stable=True)
    return Pairs(
        token=order // routing.indices.shape[1],
        weight=routing.weights.flatten().index_select(0, order),  # (see gather)
        counts=routing.load,
    )


def gather(x: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """The sorted pairs' rows of x [N, hidden] → [N·K_r, hidden]. ``index_select``, not
    ``x[pairs.token]``: its backward is one scatter-add, where indexing's backward (an
    accumulating index_put) sorts the indices again and launches a dozen kernels on a GPU."""
    return x.index_select(0, pairs.token)


def combine(out: torch.Tensor, pairs: Pairs, n_tokens: int) -> torch.Tensor:
    """Σ_i g_{i,t} FFN_i(u_t) (eq. 12, routed part) from the sorted rows' outputs [N·K_r, H]: a
    weighted scatter-add, in at least fp32 (a token's K_r terms summed in bf16 would round)."""
    acc = torch.promote_types(out.dtype, torch.float32)
    y = out.new_zeros((n_tokens, out.shape[1]), dtype=acc)
    return y.index_add_(0, pairs.token, out.to(acc) * pairs.weight[:, None].to(acc))


class Dispatcher(Protocol):
    """How an MoE layer computes its routed part: (experts, shared experts or None, tokens
    x [N, hidden], their Routing) → routed + shared output [N, hidden] in x's dtype. It is given
    the shared experts so that it may run them while routed tokens are in flight."""

    def __call__(
        self, experts: Experts, shared: nn.Module | None, x: torch.Tensor, routing: Routing
    ) -> torch.Tensor: ...


class LocalDispatcher:
    """Every expert on this process: sort the pairs, run the experts, combine."""

    def __call__(
        self, experts: Experts, shared: nn.Module | None, x: torch.Tensor, routing: Routing
    ) -> torch.Tensor:
        pairs = sort_pairs(routing)
        y = combine(experts(gather(x, pairs), pairs.counts), pairs, x.shape[0]).to(x.dtype)
        return y if shared is None else y + shared(x)
