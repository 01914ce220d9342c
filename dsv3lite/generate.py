"""Decoding with the KV cache: the prompt is prefilled once, then one token is fed per step.

Each step feeds only the newest token; the attention reads every earlier token from the cache.
With ``attn_impl="absorb"`` that cache is MLA's latent c^KV plus the shared RoPE key k^R
(report §2.1.1): 576 numbers per token per layer at the release's shapes, where ``"naive"``
keeps the expanded keys and values of every head. The two paths give the same tokens.

``decode`` owns the loop and the bookkeeping; a decoding rule is a function from the last
position's logits [B, vocab_size] to the next token ids [B]. ``greedy`` is the argmax rule;
``sample`` draws from the temperature-scaled distribution, optionally cut to its nucleus
(top-p). ``dsv3lite.speculative`` decodes the same distributions faster with the MTP module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import UserInputError
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
    return decode(model, input_ids, max_new_tokens, argmax, attn_impl=attn_impl)


@torch.no_grad()
def sample(
    model: DeepSeekV3,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    attn_impl: str = "absorb",
) -> torch.Tensor:
    """Like ``greedy``, but each token is drawn from softmax(logits / temperature), top-p cut.

    ``temperature=0`` is greedy decoding (the limit of the distribution as T → 0). Pass a seeded
    ``generator`` (on the model's device) for reproducible draws.
    """
    rule = sampling_rule(temperature, top_p, generator)
    return decode(model, input_ids, max_new_tokens, rule, attn_impl=attn_impl)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy rule: the most likely token of each row."""
    return logits.argmax(dim=-1)


def sampling_rule(
    temperature: float, top_p: float, generator: torch.Generator | None = None
) -> NextToken:
    """The ``next_token`` rule for ``decode``: argmax at temperature 0, else a draw from
    ``probabilities(logits, temperature, top_p)``."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return argmax

    def draw(logits: torch.Tensor) -> torch.Tensor:
        probs = probabilities(logits, temperature, top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return draw


def probabilities(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) [..., V] in fp32, restricted to the top-p nucleus and
    renormalised. Speculative sampling needs these distributions themselves, not just a draw.

    The largest logit is subtracted *before* the division (softmax does not change): at a
    tiny temperature (1e-45) logits / temperature overflows to inf and softmax returns NaN,
    whereas values <= 0 can only underflow to -inf, which is probability 0."""
    z = logits.float()
    probs = torch.softmax((z - z.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        probs = probs * top_p_mask(probs, top_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling's support: the smallest set of most likely tokens whose mass is >= top_p.

    Sorted by probability, a token is kept when the mass of the tokens before it is still below
    top_p, so the most likely token is always kept and the set stops at the first token that
    reaches top_p. Returns a bool mask shaped like ``probs``.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def check_sampling(temperature: float, top_p: float) -> None:
    """Reject a temperature below 0 or a top_p outside (0, 1], naming the argument."""
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise UserInputError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise UserInputError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


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
    check_args(model, input_ids, max_new_tokens, attn_impl)
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
        h, _ = model.hidden_states(input_ids, cache)
        new = [next_token(model.lm_head(h[:, -1]))]
        for _ in range(max_new_tokens - 1):
            h, _ = model.hidden_states(new[-1][:, None], cache)
            new.append(next_token(model.lm_head(h[:, -1])))
    finally:
        model.attn_impl = previous_impl
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def check_args(
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
