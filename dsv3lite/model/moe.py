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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels._triton import AVAILABLE as TRITON_AVAILABLE


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
        # a scatter, not bincount: bincount reads the max back to the host (a sync per layer)
        flat = indices.flatten()
        load = torch.zeros(c.n_routed_experts, dtype=torch.long, device=flat.device)
        load.index_add_(0, flat, torch.ones_like(flat))
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
    """Gate + routed experts (run on tokens grouped by expert) + shared experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [..., hidden] → (y of the same shape, the Routing of its tokens). The routing is
        returned, not kept on the module, so that balancing reads what this very call decided
        (the model collects it into ``ModelOutput.routing``)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        y = self.routed(x, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), routing

    def routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Σ_i g_{i,t} FFN_i(x_t): sort the (token, expert) pairs by expert, run each expert once
        on its contiguous slice (offsets from the per-expert counts), scatter-add back."""
        fast = TRITON_AVAILABLE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
        if fast and not torch.is_grad_enabled():
            from ..kernels.grouped_gemm import moe_forward

            return moe_forward(x, routing.indices, routing.weights, *self._stacked_experts())
        k = routing.indices.shape[1]
        flat = routing.indices.flatten()
        order = flat.argsort(stable=True)
        token = order // k
        counts = routing.load.tolist()  # one host sync, not one per expert
        xs = x[token]
        # each expert's slice is contiguous; cat (not slice assignment) keeps backward cheap
        pieces, start = [], 0
        for expert, n in zip(self.experts, counts):
            if n:
                pieces.append(expert(xs[start : start + n]))
            start += n
        out = torch.cat(pieces) if pieces else xs
        # accumulate the K_r contributions of a token in at least fp32, as bf16 sums would round
        acc = torch.promote_types(x.dtype, torch.float32)
        w = routing.weights.flatten()[order, None].to(acc)
        y = torch.zeros_like(x, dtype=acc).index_add_(0, token, out.to(acc) * w)
        return y.to(x.dtype)

    def _stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights stacked for the grouped GEMM: [E, 2I, hidden] (gate rows, then up
        rows) and [E, hidden, I]. Built once and rebuilt only when a weight changes (its
        version counter moves: optimizer steps, load_state_dict); costs one more copy of the
        experts' weights in memory."""
        params = [
            p
            for e in self.experts
            for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)
        ]
        key = tuple((p.data_ptr(), _version(p)) for p in params)
        if getattr(self, "_stacked_key", None) != key:
            self._stacked = (
                torch.stack(
                    [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts]
                ),
                torch.stack([e.down_proj.weight for e in self.experts]),
            )
            self._stacked_key = key
        return self._stacked


def _version(p: torch.Tensor) -> int:
    """A tensor's in-place-update counter; inference tensors have none (and no optimizer)."""
    return -1 if p.is_inference() else p._version
