"""Multi-head Latent Attention (report §2.1.1, eqs. 1–11), with two equal paths.

Keys and values are compressed jointly into a latent c^KV_t = W^DKV h_t (eq. 1, kv_lora_rank
wide); per-head keys and values come back up through W^UK and W^UV (eqs. 2, 5). Position
enters only through a separate, decoupled key k^R_t = RoPE(W^KR h_t) shared by all heads
(eq. 3), because RoPE between W^UK and the query would stop W^UK from being folded.

* ``naive``  — expand K and V for every cached token, then ordinary attention; its cache holds
  the expanded K/V.
* ``absorb`` — fold W^UK into the query (q^C·W^UK) and W^UV into the output, so attention runs
  directly against the latent; its cache holds only c^KV and k^R. This is how the release is
  served: fewer bytes per token, more FLOPs per byte (compute-bound decode at 128 heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels._triton import AVAILABLE as TRITON_AVAILABLE
from .cache import KVCache
from .norm import RMSNorm
from .rope import apply_rope

ATTN_IMPLS = ("naive", "absorb")


class MLA(nn.Module):
    """MLA with the release's parameter names (q_a_proj … o_proj)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        c = config
        self.n_heads = c.num_attention_heads
        self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        qk = c.qk_head_dim
        if c.q_lora_rank:  # eqs. (6)-(7): queries are compressed too, to save training memory
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * qk, bias=False)
        # W^DKV and W^KR in one matrix (eqs. 1 and 3): [c^KV | k^R] = h W
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        # W^UK and W^UV in one matrix (eqs. 2 and 5), per head [nope | v] rows
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=False)
        self.softmax_scale = c.softmax_scale

    def _queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q^C (no position) and q^R (rotated), each [B, T, H, ·] (eqs. 6–9)."""
        b, t, _ = x.shape
        if self.config.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(b, t, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.config.rope_interleave)

    def _latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """c^KV (normed) [B, T, kv_lora_rank] and k^R (rotated) [B, T, d_h^R] (eqs. 1, 3)."""
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin, self.config.rope_interleave)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        impl: str = "naive",
    ) -> torch.Tensor:
        """x [B, T, hidden] → [B, T, hidden]; ``mask`` [T, S] additive (0 / -inf) or None."""
        q_nope, q_pe = self._queries(x, cos, sin)
        kv, k_pe = self._latent(x, cos, sin)
        if impl == "naive":
            out = self._naive(q_nope, q_pe, kv, k_pe, mask, cache)
        elif impl == "absorb":
            out = self._absorbed(q_nope, q_pe, kv, k_pe, mask, cache)
        else:
            raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
        return self.o_proj(out.flatten(2))

    def _naive(self, q_nope, q_pe, kv, k_pe, mask, cache):
        b, t, h, _ = q_nope.shape
        kv_up = self.kv_b_proj(kv).view(b, t, h, self.nope + self.v_dim)
        k_nope, v = kv_up.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, t, h, self.rope)], dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        q = torch.cat([q_nope, q_pe], dim=-1)
        # Ordinary attention over the expanded heads: torch's fused kernel (fp32 softmax inside)
        # instead of materialising the [B, H, T, S] scores; same result as _softmax below.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=None if mask is None else mask.to(q.dtype),
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, kv, k_pe, mask, cache):
        if cache is not None:
            kv, k_pe = cache.update(self.layer_idx, kv, k_pe)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W^UK folded into the query
        if _decode_kernel_applies(q_latent, kv, cache):
            out_latent = _decode_kernel(q_latent, q_pe, kv, k_pe, self.softmax_scale)
        else:
            scores = torch.einsum("bshc,btc->bsht", q_latent, kv)
            scores = (scores + torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
            probs = _softmax(scores, mask).to(kv.dtype)
            out_latent = torch.einsum("bsht,btc->bshc", probs, kv)
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv)  # W^UV folded into the output


def _decode_kernel_applies(q_latent: torch.Tensor, kv: torch.Tensor, cache: KVCache | None) -> bool:
    """One new token per sequence over a bf16/fp16 cache on a GPU, without autograd: the case
    the Triton decode kernel (kernels/mla_decode.py) is written for, where Triton is installed."""
    return (
        cache is not None
        and TRITON_AVAILABLE
        and kv.is_cuda
        and q_latent.shape[1] == 1
        and kv.dtype in (torch.bfloat16, torch.float16)
        and q_latent.dtype == kv.dtype
        and not torch.is_grad_enabled()
    )


def _decode_kernel(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Σ_j softmax_j(s) c^KV_j with the Triton kernel; every row has the whole cache filled."""
    from ..kernels.mla_decode import mla_decode

    b, length = kv.shape[:2]
    lengths = torch.full((b,), length, dtype=torch.int32, device=kv.device)
    return mla_decode(q_latent, q_pe, kv, k_pe, lengths, softmax_scale, max_seqlen=length)


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys in fp32; ``mask`` [S, T] broadcasts over batch and heads."""
    scores = scores.float()
    if mask is not None:
        scores = scores + mask[None, :, None, :]
    return F.softmax(scores, dim=-1)
