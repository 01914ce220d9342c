"""Load balancing for DeepSeekMoE (report §2.1.2) and the statistic that judges it.

* Auxiliary-loss-free balancing: after each step, per MoE layer,
  b_i ← b_i + γ · sign(mean_load − load_i): overloaded experts become less attractive to the
  *selection* only (the bias never enters the gating weights, eq. 16), so no gradient fights
  the language-modelling loss.
* Complementary sequence-wise balance loss (eqs. 17–20), with a small α:
      L_Bal = α Σ_i f_i P_i,   f_i = N_r/(K_r T) Σ_t 1(expert i in token t's top-K_r),
      s'_{i,t} = s_{i,t} / Σ_j s_{j,t},   P_i = (1/T) Σ_t s'_{i,t}
  computed per sequence and averaged over the batch.
* MaxVio = max_i load_i / mean load − 1 (Loss-Free Balancing, arXiv 2408.15664): 0 is perfect.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE, Routing

BALANCE_MODES = ("aux-free", "aux-loss", "none")


@torch.no_grad()
def update_bias(moe_layers: list[MoE], loads: list[torch.Tensor], gamma: float) -> None:
    """The aux-loss-free rule, from each layer's load over the whole step (all micro-batches)."""
    for moe, load in zip(moe_layers, loads):
        load = load.float()
        moe.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


def sequence_balance_loss(routing: Routing, batch_size: int, alpha: float) -> torch.Tensor:
    """Eqs. (17)–(20) for one MoE layer whose N = batch_size · T tokens were routed together."""
    n_experts = routing.scores.shape[1]
    k = routing.indices.shape[1]
    scores = routing.scores.view(batch_size, -1, n_experts)  # [B, T, N_r]
    t = scores.shape[1]
    chosen = torch.zeros_like(scores).scatter_(
        2, routing.indices.view(batch_size, t, k), 1.0
    )  # 1(s_{i,t} ∈ TopK)
    f = chosen.sum(dim=1) * n_experts / (k * t)  # [B, N_r]            eq. (18)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, N_r]  eqs. (19)-(20)
    return alpha * (f * p).sum(dim=-1).mean()  # eq. (17), averaged over sequences


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's per-expert token counts."""
    load = load.float()
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0
