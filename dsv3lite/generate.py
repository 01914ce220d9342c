"""Decoding with the KV cache: the prompt is prefilled once, then one token is fed per step.

Each step feeds only the newest token; the attention reads every earlier token from the cache.
With ``attn_impl="absorb"`` that cache is MLA's latent c^KV plus the shared RoPE key k^R
(report §2.1.1): 576 numbers per token per layer at the release's shapes, where ``"naive"``
keeps the expanded keys and values of every head. The two paths give the same tokens.

``decode`` owns the loop and the bookkeeping; a decoding rule is a function from the last
position's logits [B, vocab_size] to the next token ids [B]. ``greedy`` is the argmax rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .model import DeepSeekV3
from .model.mla import ATTN_IMPLS

NextToken = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def greedy(
    model: DeepSeekV3,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attn_impl: str = "absorb",
) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` [B, T]; returns [B, T + n] long.

    ``attn_impl`` picks the MLA path for this call only (the model's own setting is restored).
    """
    return decode(model, input_ids, max_new_tokens, _argmax, attn_impl=attn_impl)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.no_grad()
def decode(
    model: DeepSeekV3,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    next_token: NextToken,
    *,
    attn_impl: str = "absorb",
) -> torch.Tensor:
    """Run the cached decoding loop with the rule ``next_token``; returns prompt + new tokens."""
    _check_args(model, input_ids, max_new_tokens, attn_impl)
    input_ids = input_ids.long()
    if max_new_tokens == 0:
        return input_ids.clone()
    previous_impl = model.attn_impl
    model.attn_impl = attn_impl
    try:
        batch, prompt_len = input_ids.shape
        # The last new token is returned, never fed back: the cache needs one slot less.
        cache = model.new_cache(batch, prompt_len + max_new_tokens - 1)
        # Prefill: only the last position's logits are needed, so the head runs once per row.
        h = model.hidden_states(input_ids, cache)
        new = [next_token(model.lm_head(h[:, -1]))]
        for _ in range(max_new_tokens - 1):
            h = model.hidden_states(new[-1][:, None], cache)
            new.append(next_token(model.lm_head(h[:, -1])))
    finally:
        model.attn_impl = previous_impl
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def _check_args(
    model: DeepSeekV3, input_ids: torch.Tensor, max_new_tokens: int, attn_impl: str
) -> None:
    """Reject bad arguments before any work, naming the argument and what it allows."""
    if not isinstance(model, DeepSeekV3):
        raise TypeError(f"model must be a dsv3lite DeepSeekV3, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a tensor of shape [batch, prompt_len]")
    if input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids needs at least one row and one prompt token, got shape {tuple(input_ids.shape)}"
        )
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    total = input_ids.shape[1] + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds max_position_embeddings={limit}"
        )
