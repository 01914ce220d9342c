"""Small models and plain references that several test files share (imported as ``models``,
beside ``crash``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3lite import DeepSeekV3, ModelConfig

# every structural feature at toy size: query compression, groups, a dense first layer
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
             num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
             routed_scaling_factor=2.5, max_position_embeddings=64)  # fmt: skip


def random_model(seed: int = 0, **overrides) -> DeepSeekV3:
    """Fresh random weights, norms away from 1 and a non-zero router bias, so that a key
    mapped to the wrong place shows."""
    torch.manual_seed(seed)
    model = DeepSeekV3(ModelConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def per_pair_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """Eq. (12) token by token, choice by choice, in ``moe``'s dtype: nothing sorted, stacked
    or fused — the reference every dispatch path is checked against."""
    routing = moe.gate(x)
    w1, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
    rows = []
    for t in range(x.shape[0]):
        y = moe.shared_experts(x[t])
        for e, g in zip(routing.indices[t].tolist(), routing.weights[t]):
            gate, up = (w1[e] @ x[t]).chunk(2)
            y = y + g.to(x.dtype) * (w2[e] @ (F.silu(gate) * up))
        rows.append(y)
    return torch.stack(rows)
