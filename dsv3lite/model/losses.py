"""The training losses the model computes for its ``ModelOutput`` (report §2.1.2, §2.2).

* Next-token cross-entropy, and per MTP depth k (eq. 24)
      L^k_MTP = −(1/T) Σ_{i=2+k}^{T+1} log P^k_i[t_i]
  taken here as a mean over the T−k positions that have a target (eq. 24 divides the sum by T:
  a constant factor (T−k)/T).
* The MTP objective, eq. (25): L_MTP = (λ/D) Σ_k L^k_MTP.
* The complementary sequence-wise balance loss (eqs. 17–20), with a small α:
      L_Bal = α Σ_i f_i P_i,   f_i = N_r/(K_r T) Σ_t 1(expert i in token t's top-K_r),
      s'_{i,t} = s_{i,t} / Σ_j s_{j,t},   P_i = (1/T) Σ_t s'_{i,t}
  computed per sequence and averaged over the batch.

All in fp32, whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import Routing


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against labels [B, T], in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def mtp_objective(mtp_losses: list[torch.Tensor], mtp_lambda: float) -> torch.Tensor:
    """Eq. (25): λ times the mean of the per-depth MTP losses."""
    return mtp_lambda * sum(mtp_losses) / len(mtp_losses)


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
