"""Reference solutions of the exercises — look only after trying.

One function per coding exercise, each passing its check in ``dsv3lite.exercises``. The
notebooks never import this module (a student's own cell is the one that runs, and its check
says "not done yet" until it is written); tests/test_exercises*.py run every solution against
its check. To see one work in a notebook:

    from dsv3lite.exercises.solutions import absorbed_query
    check_absorbed_query(absorbed_query)

The Triton kernel of notebook 05 is defined only where Triton is installed (Linux), and is a
CPU (interpreted) kernel only if ``TRITON_INTERPRET=1`` was set before this module was first
imported.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import tl, triton
from ..model.mla import MLA
from ..model.mtp import MTPModule


# ------------------------------------------------------------------------------ 01 MLA
def absorbed_query(mla: MLA, q_nope: torch.Tensor) -> torch.Tensor:
    """q^C [B, T, H, d_h] → q^C·W^UK [B, T, H, kv_lora_rank]: W^UK folded into the query."""
    w = mla.kv_b_proj.weight.view(mla.n_heads, mla.nope + mla.v_dim, mla.kv_lora_rank)
    w_uk = w[:, : mla.nope]  # each head's block of rows is [W^UK_h ; W^UV_h]
    return torch.einsum("bshd,hdc->bshc", q_nope, w_uk)


def absorbed_values(mla: MLA, probs: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
    """probs [B, H, T, S], c_kv [B, S, d_c] → o [B, T, H, v_head_dim] = W^UV (Σ_j p_ij c_j)."""
    w = mla.kv_b_proj.weight.view(mla.n_heads, mla.nope + mla.v_dim, mla.kv_lora_rank)
    o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)  # average the latents first...
    return torch.einsum("bthc,hdc->bthd", o_latent, w[:, mla.nope :])  # ...then W^UV once


# ------------------------------------------------------------------------------ 02 MoE
def group_limited_topk(
    scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (16) with group-limited routing, then eq. (13): (indices [N, k], weights [N, k])."""
    n, n_experts = scores.shape
    biased = scores + bias  # the bias steers the choice...
    grouped = biased.view(n, n_group, n_experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # a group's two best experts
    keep = group_scores.topk(topk_group, dim=-1).indices
    dropped = torch.ones(n, n_group, dtype=torch.bool).scatter_(1, keep, False)
    # -inf, not 0.0: biased scores can be negative, and 0.0 would then beat them
    masked = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    indices = masked.topk(k, dim=-1).indices
    weights = scores.gather(1, indices)  # ...but the weights come from the unbiased scores
    return indices, weights / weights.sum(dim=-1, keepdim=True)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of per-expert token counts: the busiest expert over the mean, minus one."""
    load = load.float()
    return float(load.max() / load.mean() - 1)


# ------------------------------------------------------------------------------ 03 MTP
def mtp_combine(mtp: MTPModule, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
    """Eq. (21): M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], embedding first."""
    return mtp.eh_proj(torch.cat([mtp.enorm(emb_next), mtp.hnorm(h_prev)], dim=-1))


def mtp_loss(mtp_logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """L^k_MTP (eq. 24): depth k at position i predicts t_{i+k+1} = labels[:, i+k]."""
    return F.cross_entropy(mtp_logits.flatten(0, 1), labels[:, k:].flatten())


# ------------------------------------------------------------------------------ 04 FP8 numerics
def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 128) → (q [M, K] E4M3, s [M, K/128] float32), x ≈ q · s."""
    m, k = x.shape
    tiles = x.float().view(m, k // 128, 128)
    s = tiles.abs().amax(dim=-1) / 448.0  # the tile's largest magnitude lands on 448
    s = torch.where(s > 0, s, 1.0)  # a tile of zeros: any scale works, and 0 would give NaN
    q = (tiles / s[..., None]).to(torch.float8_e4m3fn)
    return q.view(m, k), s


# ------------------------------------------------------------------------------ 05 FP8 kernels
def block_scaled_k_loop(
    a: np.ndarray, a_s: np.ndarray, b: np.ndarray, b_s: np.ndarray
) -> np.ndarray:
    """C = a @ bᵀ from 1×128-scaled ``a`` and 128×128-scaled ``b``, one K block at a time."""
    m, k = a.shape
    n = b.shape[0]
    c = np.zeros((m, n), dtype=np.float32)
    for kb in range(k // 128):
        cols = slice(kb * 128, (kb + 1) * 128)
        partial = a[:, cols] @ b[:, cols].T  # what one tensor-core pass accumulates
        b_scale = np.repeat(b_s[:, kb], 128)[:n]  # output column n reads block n // 128
        c += partial * a_s[:, kb, None] * b_scale[None, :]  # promoted into FP32
    return c


@triton.jit
def tile_scale_kernel(x_ptr, s_ptr, K, BLOCK: tl.constexpr):
    """Program (row, tile): the scale of x[row, tile·BLOCK : (tile+1)·BLOCK]."""
    row, tile = tl.program_id(0), tl.program_id(1)
    x = tl.load(x_ptr + row * K + tile * BLOCK + tl.arange(0, BLOCK))
    s = tl.max(tl.abs(x), axis=0) / 448.0
    tl.store(s_ptr + row * (K // BLOCK) + tile, tl.where(s > 0, s, 1.0))


# ------------------------------------------------------------------------------ 06 expert parallel
def dispatch_counts(indices: torch.Tensor, n_experts: int, world_size: int) -> torch.Tensor:
    """Rows this rank sends to each rank: one per (token, expert) pair, to the expert's owner."""
    owner = indices // (n_experts // world_size)  # contiguous shards of experts
    return torch.bincount(owner.flatten(), minlength=world_size)


# ------------------------------------------------------------------------------ 07 DualPipe
def pipeline_bubble(kind: str, pp: int, F: float, B: float, W: float, FB: float) -> float:
    """Table 2's bubble for '1f1b', 'zb1p' or 'dualpipe'."""
    if kind == "1f1b":
        return (pp - 1) * (F + B)
    if kind == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    return (pp / 2 - 1) * (FB + B - 3 * W)


def one_f_one_b(pp: int, rank: int, micro_batches: int) -> list[str]:
    """One rank's 1F1B ops: warm-up forwards, then F/B pairs, then the remaining backwards."""
    warmup = min(pp - 1 - rank, micro_batches)
    ops = [f"F{i}" for i in range(warmup)]
    for i in range(warmup, micro_batches):
        ops += [f"F{i}", f"B{i - warmup}"]
    ops += [f"B{i}" for i in range(micro_batches - warmup, micro_batches)]
    return ops


# ------------------------------------------------------------------------------ 08 training
def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """b_i + γ · sign(mean load − load_i): only the direction of the violation counts."""
    load = load.float()
    return bias + gamma * torch.sign(load.mean() - load)


# ------------------------------------------------------------------------------ 09 inference
def decode_step(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    k_pe_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Σ_j softmax_j(q_latent · c^KV_j + q^R · k^R_j) c^KV_j over each sequence's valid cache."""
    valid = torch.arange(kv_cache.shape[1]) < cache_seqlens[:, None]  # [B, L]
    # zero what lies past each length: a weight of 0 times NaN garbage would still be NaN
    kv = kv_cache.masked_fill(~valid[..., None], 0.0)
    k_pe = k_pe_cache.masked_fill(~valid[..., None], 0.0)
    scores = torch.einsum("bhc,blc->bhl", q_latent, kv) + torch.einsum("bhr,blr->bhl", q_pe, k_pe)
    scores = (scores * softmax_scale).masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhl,blc->bhc", scores.softmax(dim=-1), kv)


# ------------------------------------------------------------------------------ 10 speculation
def greedy_verify(main_logits: torch.Tensor, draft: int) -> list[int]:
    """Greedy verification of an MTP draft (notebook 10): row 0 of ``main_logits`` [2, V]
    predicts the draft's slot, row 1 the slot after it."""
    choice = int(main_logits[0].argmax())
    if choice == draft:
        return [draft, int(main_logits[1].argmax())]
    return [choice]
