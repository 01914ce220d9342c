"""Rotary position embedding for the decoupled RoPE part of MLA (§2.1.1), with YaRN.

Only the d_h^R = qk_rope_head_dim channels rotate. Two layouts exist in the wild:
``interleave=True`` rotates pairs (x0, x1), (x2, x3), ... — the release's layout, where the
official inference code views the pairs as complex numbers; ``interleave=False`` rotates
(x_i, x_{i+d/2}) — the "rotate_half" layout of Llama-style code. They differ only by a fixed
permutation of the channels, applied to the weights that produce them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies θ_j = base^(-2j/d) and the cos/sin attention factor.

    With YaRN (arXiv 2309.00071) the high frequencies keep their values (extrapolation),
    the low ones are divided by ``factor`` (interpolation), with a linear ramp between the
    dimensions that complete ``beta_fast`` and ``beta_slow`` rotations over the original
    context. The attention factor mscale(factor, mscale)/mscale(factor, mscale_all_dim)
    is 1 for the release (both 1.0); the softmax scale takes mscale² separately
    (``ModelConfig.softmax_scale``).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if not rs:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables of shape [T, d_h^R / 2] for the given positions (fp32)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    """Rotate the last dim of x [B, T, (H,) d] by the angles of its position (cos/sin [T, d/2])."""
    dtype = x.dtype
    x = x.float()
    if x.dim() == 4:  # [B, T, H, d]: broadcast over heads
        cos, sin = cos[:, None, :], sin[:, None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)
