"""Reference solutions to the exercises notebook 01 adds (the checks are in
``dsv3lite.exercises.mla``). The notebook never imports this module: the student's cell is
the one that runs. ``absorbed_query``'s solution is in ``dsv3lite.exercises.solutions``."""

from __future__ import annotations

import torch

from ..model.mla import MLA


def absorbed_values(mla: MLA, probs: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
    """probs [B, H, T, S], c_kv [B, S, d_c] → o [B, T, H, v_head_dim] = W^UV (Σ_j p_ij c_j)."""
    w = mla.kv_b_proj.weight.view(mla.n_heads, mla.nope + mla.v_dim, mla.kv_lora_rank)
    o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)  # average the latents first...
    return torch.einsum("bthc,hdc->bthd", o_latent, w[:, mla.nope :])  # ...then W^UV once
