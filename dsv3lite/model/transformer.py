"""The whole model: embedding, the blocks, the final norm, the output head, the MTP modules.

Module names equal the release's checkpoint keys (``model.layers.3.self_attn.kv_b_proj.weight``
…), so loading is a name-for-name copy; only the MTP modules live under ``model.mtp.k`` here and
under ``model.layers.{num_hidden_layers + k}`` on disk.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import check_bool, check_number
from .block import DecoderLayer
from .cache import KVCache
from .losses import cross_entropy, mtp_objective, sequence_balance_loss
from .mla import ATTN_IMPLS
from .moe import MoE, Routing
from .mtp import MTPModule
from .norm import RMSNorm
from .output import ModelOutput
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

    ``model(input_ids)`` returns a ``ModelOutput``: ``.logits`` [B, T, vocab_size] and the
    ``.routing`` of every MoE layer; with ``labels`` also the losses (see ``forward``). Pass a
    ``KVCache`` (from ``new_cache``) to decode incrementally; ``attn_impl`` picks the MLA path
    ('naive' or 'absorb'), which changes speed and cache size, never the result.
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

    def compile_layers(self) -> None:
        """``torch.compile`` each decoder layer and MTP module in place. On a GPU the eager
        training step is bound by the host launching thousands of small kernels (norms, RoPE,
        SwiGLU, residual adds); compiled, each layer fuses them. Layers of one kind share one
        graph, and the experts' path has no host synchronisation, so changing expert loads do
        not recompile."""
        for module in (*self.model.layers, *self.model.mtp):
            module.compile()
        # the head and the losses too: the fp32 cross-entropy over the vocabulary fuses into a
        # few kernels instead of materialising fp32 logits (an instance attribute: the model's
        # forward calls self.outputs, so this is the path it takes)
        self.outputs = torch.compile(self.outputs)

    def moe_layers(self) -> list[MoE]:
        """Every MoE FFN, main layers first, then the MTP modules' (the order of
        ``ModelOutput.routing``), whatever their dispatcher (local or expert-parallel)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

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

    def hidden_states(
        self, input_ids: torch.Tensor, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, list[Routing]]:
        """The main model's output after the final norm, [B, T, hidden] (h^0 for MTP), and the
        Routing of each of its MoE layers in order."""
        start = cache.seq_len if cache is not None else 0
        self._check_ids(input_ids, start)
        if cache is not None and cache.impl != self.attn_impl:
            raise ValueError(f"cache was made for {cache.impl!r}, model uses {self.attn_impl!r}")
        x = self.model.embed_tokens(input_ids)
        cos, sin, mask = self._positions(start, input_ids.shape[1], x.device)
        routing = []
        for layer in self.model.layers:
            x, r = layer(x, cos, sin, mask, cache, self.attn_impl)
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.model.norm(x), routing

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        mtp: bool | None = None,
        mtp_lambda: float = 0.0,
        alpha: float | None = None,
    ) -> ModelOutput:
        """Run the model on input_ids [B, T] (continuing ``cache`` if given).

        labels [B, T]: the target of each position, i.e. the next token (labels[:, t] is token
        t+1); given, the output holds the losses. ``mtp_lambda`` is λ of eq. (25); ``alpha``
        the sequence-wise balance loss's weight α (None: no balance term, a number: added to
        the loss, also when 0). The MTP modules run when ``mtp`` is True, or by default when
        labels are given with λ > 0: plain inference is one pass of the main model.
        """
        check_number("mtp_lambda", mtp_lambda, strict=False)
        if alpha is not None:
            check_number("alpha", alpha, strict=False)
        if mtp is None:
            mtp = labels is not None and mtp_lambda > 0
        check_bool("mtp", mtp)
        if labels is not None and (
            not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape
        ):
            raise ValueError(
                f"labels must be a tensor with the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {getattr(labels, 'shape', type(labels).__name__)}"
            )
        if mtp and cache is not None:
            raise ValueError("mtp=True needs the whole sequence: run it without a cache")
        h, routing = self.hidden_states(input_ids, cache)
        return self.outputs(
            h, input_ids, labels, routing, mtp=mtp, mtp_lambda=mtp_lambda, alpha=alpha
        )

    def outputs(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        routing: list[Routing],
        *,
        mtp: bool,
        mtp_lambda: float,
        alpha: float | None,
    ) -> ModelOutput:
        """Everything after the main layers, from h = their normed output [B, T, hidden]: the
        head, the MTP modules (eqs. 21–23), and the losses (eqs. 17–20, 24–25) with ``routing``
        (the main layers') and the MTP modules' own. A pipeline's last stage calls it with
        ``routing=[]``: each stage adds its own layers' balance term."""
        logits = self.lm_head(h)
        out = ModelOutput(logits=logits, routing=list(routing))
        if mtp:
            for k, module in enumerate(self.model.mtp, start=1):
                t = input_ids.shape[1] - k
                if t <= 0:
                    break
                h, r = self.mtp_step(module, h[:, :t], input_ids[:, k:], start=0)
                out.mtp_logits.append(self.lm_head(module.shared_head.norm(h)))
                if r is not None:
                    out.routing.append(r)
        if labels is None:
            return out
        out.main_loss = total = cross_entropy(logits, labels)
        out.mtp_losses = [
            cross_entropy(mtp_logits, labels[:, k:])
            for k, mtp_logits in enumerate(out.mtp_logits, start=1)
        ]
        if out.mtp_losses:
            total = total + mtp_objective(out.mtp_losses, mtp_lambda)  # eq. (25)
        if alpha is not None:
            batch = input_ids.shape[0]
            out.balance_loss = sum(
                (sequence_balance_loss(r, batch, alpha) for r in out.routing),
                total.new_zeros(()),
            )
            total = total + out.balance_loss
        out.loss = total
        return out

    def mtp_step(
        self,
        module: MTPModule,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        start: int,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, Routing | None]:
        """Eqs. (21)–(22) for positions start … start+T-1: returns h^k before the head's norm,
        and the Routing of the module's MoE (None when it is dense)."""
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
