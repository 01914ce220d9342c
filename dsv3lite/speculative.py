"""MTP self-speculative decoding (report §5.4.3): the MTP module drafts, the main model verifies.

DeepSeek-V3 trains one MTP module (D = 1, §2.2) to predict the token after next. At inference
the report drops it or uses it to decode faster: with the next token t_{i+1} chosen, the module
drafts t_{i+2} from the main model's final hidden state h_i and Emb(t_{i+1}) (eqs. 21–23), and
one main-model forward over the two tokens [t_{i+1}, draft] both checks the draft and yields
the token after it. The report measures 85–90% of drafts accepted and 1.8× the tokens per second.

One step, with the main cache holding positions < i+1 and the MTP cache positions < i::

    MTP   (h_i, t_{i+1})         -> draft d for t_{i+2}        (its own cache, position i)
    main  [t_{i+1}, d]           -> p(· | ≤ t_{i+1}), p(· | ≤ d)  (positions i+1, i+2)
    accept d: 2 new tokens (d, then a bonus token from the second row); the next step feeds
              the MTP (h_{i+1}, d) and (h_{i+2}, bonus)
    reject d: 1 new token from the first row; the main cache forgets position i+2 (seq_len -= 1)
              and the next step feeds the MTP (h_{i+1}, that token)

The MTP module sees, at every accepted position i, the pair (h_i, t_{i+1}) it was trained on
(eq. 21), in its own ``KVCache``: its attention reads its own earlier positions, and its
seq_len runs one behind the main model's.

Verification follows the decoding rule. Greedy: accept when the main model's argmax is the
draft, so the output equals ``greedy`` token for token. Sampling (Leviathan et al. 2023,
Chen et al. 2023): accept with probability min(1, p(d)/q(d)), else draw from
norm(max(0, p − q)), so every token is distributed exactly as the main model's own sample.

One sequence at a time (batch size 1): rows of a batch accept different numbers of tokens, and
this reference keeps every cache a single length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .generate import check_args, check_sampling, probabilities
from .model import DeepSeekV3, KVCache
from .model.mtp import MTPModule


@dataclass
class SpecStats:
    """What one ``speculative_generate`` call did; plain decoding has 1 token per forward."""

    new_tokens: int = 0
    main_forwards: int = 0  # the prefill included; plain decoding needs one per new token
    drafts: int = 0  # tokens proposed by the MTP module (one per verification forward)
    accepted: int = 0  # drafts the main model kept
    seconds: float = 0.0  # wall clock of the whole call, prefill included
    outcomes: list[bool] = field(default_factory=list)  # per verification: draft accepted?

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts proposed (the report: 85–90% for the second token)."""
        return self.accepted / self.drafts if self.drafts else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward: what speculation buys when forwards dominate."""
        return self.new_tokens / self.main_forwards if self.main_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of wall clock, prefill included, as a user waits for them."""
        return self.new_tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def speculative_generate(
    model: DeepSeekV3,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    attn_impl: str = "absorb",
) -> tuple[torch.Tensor, SpecStats]:
    """Decode ``max_new_tokens`` after ``input_ids`` [1, T] with MTP drafts; returns
    (prompt + new tokens [1, T + n], SpecStats).

    The tokens follow the same distribution as ``sample(model, ..., temperature, top_p)``
    (``temperature=0``: exactly ``greedy``'s tokens); only the number of main forwards changes.
    Needs ``num_nextn_predict_layers >= 1``; drafts come from the first MTP module.
    """
    check_args(model, input_ids, max_new_tokens, attn_impl)
    check_sampling(temperature, top_p)
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative_generate decodes one sequence (batch size 1), got a batch of "
            f"{input_ids.shape[0]}: call it per row, or use sample/greedy for batches"
        )
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError(
            "speculative_generate drafts with the MTP module, but this model has "
            "num_nextn_predict_layers=0: use sample or greedy"
        )
    input_ids = input_ids.long()
    stats = SpecStats()
    if max_new_tokens == 0:
        return input_ids.clone(), stats
    started = time.perf_counter()
    previous_impl = model.attn_impl
    model.attn_impl = attn_impl
    try:
        new = _decode(model, input_ids, max_new_tokens, _Rule(temperature, top_p, generator), stats)
    finally:
        model.attn_impl = previous_impl
    stats.new_tokens = len(new)
    stats.seconds = time.perf_counter() - started
    new_ids = torch.tensor([new], dtype=torch.long, device=input_ids.device)
    return torch.cat([input_ids, new_ids], dim=1), stats


def _decode(
    model: DeepSeekV3, ids: torch.Tensor, max_new_tokens: int, rule: _Rule, stats: SpecStats
) -> list[int]:
    """The draft/verify loop of the module docstring; returns exactly max_new_tokens ids."""
    mtp = model.model.mtp[0]
    length = ids.shape[1] + max_new_tokens  # a verification may feed one token past the last
    cache, mtp_cache = model.new_cache(1, length), model.new_cache(1, length)
    h, _ = model.hidden_states(ids, cache)  # h_0 … h_{T-1}, after the final norm (h^0 of eq. 21)
    new = [rule.pick(model.lm_head(h[0, -1]))]
    stats.main_forwards = 1
    next_ids = torch.cat([ids[:, 1:], _ids([new[-1]], ids)], dim=1)  # t_{i+1} for each h_i
    while len(new) < max_new_tokens:
        draft_logits = _draft_logits(model, mtp, h, next_ids, mtp_cache)
        draft = rule.pick(draft_logits)
        h, _ = model.hidden_states(_ids([new[-1], draft], ids), cache)
        main_logits = model.lm_head(h[0])  # [2, V]: for the draft's slot and the one after
        stats.main_forwards += 1
        stats.drafts += 1
        accepted, token = rule.verify(main_logits[0], draft_logits, draft)
        stats.outcomes.append(accepted)
        if accepted:
            stats.accepted += 1
            new += [draft, rule.pick(main_logits[1])]
            next_ids = _ids(new[-2:], ids)
        else:
            cache.seq_len -= 1  # forget the rejected draft; its slot is overwritten next step
            h = h[:, :1]
            new.append(token)
            next_ids = _ids([token], ids)
    return new[:max_new_tokens]  # an accepted last step may overshoot by its bonus token


def _draft_logits(
    model: DeepSeekV3,
    mtp: MTPModule,
    h: torch.Tensor,
    next_ids: torch.Tensor,
    mtp_cache: KVCache,
) -> torch.Tensor:
    """Feed the MTP module its pairs (h_i, t_{i+1}) for the newly verified positions (eqs.
    21–22, positions continue its own cache) and return its logits for the next draft (eq. 23)."""
    h_mtp, _ = model.mtp_step(mtp, h, next_ids, start=mtp_cache.seq_len, cache=mtp_cache)
    mtp_cache.seq_len += h.shape[1]  # mtp_step leaves the bookkeeping to its caller
    return model.lm_head(mtp.shared_head.norm(h_mtp[0, -1]))


def _ids(tokens: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=like.device)


class _Rule:
    """Greedy or sampled choices for one call: picking a token, verifying a draft."""

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator | None) -> None:
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def pick(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = probabilities(logits, self.temperature, self.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def verify(
        self, main_logits: torch.Tensor, draft_logits: torch.Tensor, draft: int
    ) -> tuple[bool, int]:
        """(accepted, the token for the draft's slot): the draft itself when accepted."""
        if self.temperature == 0:
            token = int(main_logits.argmax())
            return token == draft, token
        p = probabilities(main_logits, self.temperature, self.top_p)
        q = probabilities(draft_logits, self.temperature, self.top_p)
        return speculative_accept(p, q, draft, self.generator)


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None = None
) -> tuple[bool, int]:
    """Speculative sampling's test for a draft d ~ q against the target p (both [V]).

    Accept with probability min(1, p(d)/q(d)); otherwise draw from norm(max(0, p − q)). The
    token returned is then distributed exactly as p: P(x) = q(x)·min(1, p(x)/q(x)) +
    (1 − Σ_y min(p(y), q(y)))·max(0, p(x) − q(x)) / Σ_y max(0, p(y) − q(y)) = p(x).
    Returns (accepted, token).
    """
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[draft] < p[draft]:  # u < p(d)/q(d), without dividing
        return True, draft
    residual = (p - q).clamp_min(0)
    if residual.sum() <= 0:  # p == q up to rounding: a rejection had probability ~0
        residual = p
    return False, int(torch.multinomial(residual, 1, generator=generator))
