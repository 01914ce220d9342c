"""Multi-Token Prediction modules (report §2.2, eqs. 21–23).

Module k combines the previous depth's representation of token i with the embedding of
token i+k, runs one transformer block, and predicts token i+k+1 through the shared head:

    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]      (21)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                            (22)
    P^k_{i+k+1} = OutHead(h^k_i)                                  (23)

Two conventions follow the released weights rather than the report's typesetting:
the concatenation puts the normed *embedding* first (``enorm``) and the normed hidden state
second (``hnorm``), as the release is served; and h^0 is the main model's output after its
final norm. ``shared_head.norm`` is the module's own final norm; the embedding and the output
matrix are the main model's (the release stores copies under this layer's index, which
``checkpoint.py`` checks and drops).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import DecoderLayer
from .norm import RMSNorm


class SharedHead(nn.Module):
    """The MTP module's own output norm; the output matrix itself is the main lm_head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(DecoderLayer):
    """A DecoderLayer plus enorm, hnorm and the projection M_k (``eh_proj``)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """Eq. (21): project [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)] back to the hidden size."""
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
