"""One transformer block: pre-norm MLA, then pre-norm FFN (dense or DeepSeekMoE).

A block returns its output and, for an MoE block, the ``Routing`` its gate decided (None for a
dense one): the caller collects them in layer order, so balancing (the bias update, the
sequence-wise loss) reads what this forward routed, with no state left on the modules.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .mla import MLA
from .moe import MLP, MoE, Routing
from .norm import RMSNorm


class DecoderLayer(nn.Module):
    """h = x + MLA(norm(x)); out = h + FFN(norm(h)). FFN is MoE from first_k_dense_replace on."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLA(config, layer_idx)
        self.mlp: nn.Module = (
            MoE(config)
            if config.is_moe_layer(layer_idx)
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        impl: str = "naive",
    ) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, impl)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MLP):
            return x + self.mlp(h), None
        y, routing = self.mlp(h)
        return x + y, routing
