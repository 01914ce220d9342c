"""The whole model: embedding, the blocks, the final norm, the output head, the MTP modules.

Module names equal the release's checkpoint keys (``model.layers.3.self_attn.kv_b_proj.weight``
…), so loading is a name-for-name copy; only the MTP modules live under ``model.mtp.k`` here and
under ``model.layers.{num_hidden_layers + k}`` on disk.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import DecoderLayer
from .cache import KVCache
from .mla import ATTN_IMPLS
from .moe import MoE
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Backbone(nn.Module):
    """Token embedding, the decoder layers, the final norm, and the MTP modules."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k)
            for k in range(config.num_nextn_predict_layers)
        )
        self.rotary_emb = RotaryEmbedding(config)


class DeepSeekV3(nn.Module):
    """A DeepSeek-V3-style causal language model.

    ``model(input_ids)`` returns logits [B, T, vocab_size]. Pass a ``KVCache`` (from
    ``new_cache``) to decode incrementally; ``attn_impl`` picks the MLA path ('naive' or
    'absorb'), which changes speed and cache size, never the result.
    """

    def __init__(self, config: ModelConfig, attn_impl: str = "naive") -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_impl = attn_impl
        self.reset_parameters()

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self._attn_impl = impl

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for matrices, ones for norms, zeros for the gate bias."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[nn.Module]:
        """Every MoE FFN, main layers first, then the MTP modules': ``MoE``, or, once
        ``shard_moe_layers`` has run, this rank's ``ExpertParallelMoE`` shards (both have the
        ``gate`` and ``last_routing`` that balancing reads)."""
        from ..parallel.expert_parallel import ExpertParallelMoE  # lazy: parallel imports model

        return [m for m in self.modules() if isinstance(m, (MoE, ExpertParallelMoE))]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for the current attn_impl (max_len defaults to the position limit)."""
        return KVCache(batch_size, max_len or self.config.max_position_embeddings, self.attn_impl)

    def _check_ids(self, input_ids: torch.Tensor, start: int) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a LongTensor of shape [batch, seq_len]")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host read for both
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"token id {hi if hi >= self.config.vocab_size else lo} is outside the "
                    f"vocabulary [0, {self.config.vocab_size})"
                )
        end = start + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence reaches position {end}, beyond max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The main model's output after the final norm, [B, T, hidden] (h^0 for MTP)."""
        start = cache.seq_len if cache is not None else 0
        self._check_ids(input_ids, start)
        if cache is not None and cache.impl != self.attn_impl:
            raise ValueError(f"cache was made for {cache.impl!r}, model uses {self.attn_impl!r}")
        x = self.model.embed_tokens(input_ids)
        cos, sin, mask = self._positions(start, input_ids.shape[1], x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, self.attn_impl)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab_size] for input_ids [B, T] (continuing ``cache`` if given)."""
        return self.lm_head(self.hidden_states(input_ids, cache))

    def forward_with_mtp(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits [B, T, V] and, per MTP depth k, logits [B, T-k, V] for tokens i+k+1."""
        h = self.hidden_states(input_ids)
        logits = self.lm_head(h)
        mtp_logits = []
        for k, module in enumerate(self.model.mtp, start=1):
            t = input_ids.shape[1] - k
            if t <= 0:
                break
            h = self.mtp_step(module, h[:, :t], input_ids[:, k:], start=0)
            mtp_logits.append(self.lm_head(module.shared_head.norm(h)))
        return logits, mtp_logits

    def mtp_step(
        self,
        module: MTPModule,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        start: int,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Eqs. (21)–(22) for positions start … start+T-1: returns h^k before the head's norm."""
        x = module.combine(h_prev, self.model.embed_tokens(next_ids))
        cos, sin, mask = self._positions(start, x.shape[1], x.device)
        return module(x, cos, sin, mask, cache, self.attn_impl)

    def _positions(self, start: int, t: int, device: torch.device):
        positions = torch.arange(start, start + t, device=device)
        cos, sin = self.model.rotary_emb(positions)
        mask = None
        if t > 1:  # query i sees keys 0 … start+i
            keys = torch.arange(start + t, device=device)
            mask = torch.zeros(t, start + t, device=device)
            mask.masked_fill_(keys[None, :] > positions[:, None], float("-inf"))
        return cos, sin, mask

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())
