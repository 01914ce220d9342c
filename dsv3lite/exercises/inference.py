"""Exercise of notebook 09: one absorbed decode step over the latent cache (report §2.1.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..testing import rel_err
from ._check import (
    ExerciseError,
    as_tensor,
    call,
    close,
    diagnose,
    exercise,
    expect_shape,
    fresh_seed,
    passed,
    seeded,
)

HINT = (
    "scores = (einsum('bhc,blc->bhl', q_latent, kv) + einsum('bhr,blr->bhl', q_pe, k_pe)) "
    "· softmax_scale; mask positions l ≥ cache_seqlens[b] with -inf; softmax over l; "
    "out = einsum('bhl,blc->bhc', probs, kv) — with the cache past each length zeroed first"
)
B, H, C, R, L = 3, 4, 32, 8, 20
# (name, lengths, what fills the cache past each length)
STAGES = (
    ("every sequence fills the cache", "full", None),
    ("sequences of different lengths, stale values past each length", "ragged", "stale"),
    ("sequences of different lengths, NaN past each length", "ragged", "nan"),
)


@exercise
def check_decode_step(decode_step: Callable, *, seed: int | None = None) -> None:
    """Check ``decode_step(q_latent, q_pe, kv_cache, k_pe_cache, cache_seqlens, softmax_scale)``.

    One new token per sequence, absorbed: ``q_latent`` [B, H, kv_lora_rank] (q^C with W^UK
    folded in) and ``q_pe`` [B, H, rope dim] score the cached c^KV (``kv_cache`` [B, L,
    kv_lora_rank]) and k^R (``k_pe_cache`` [B, L, rope dim]); sequence b has
    ``cache_seqlens[b]`` valid positions, and what lies past them is garbage (a pre-allocated
    cache). The answer [B, H, kv_lora_rank] is Σ_j softmax_j(s) c^KV_j, before W^UV. Checked
    against ``mla_decode_reference`` of ``kernels/mla_decode.py`` in three stages: full caches,
    then ragged lengths with stale values, then with NaN past each length (0 · NaN is NaN, so
    the masked positions must be left out of the weighted sum, not only weighted 0). Raises
    ExerciseError saying what is wrong; prints a line when right.
    """
    from ..kernels.mla_decode import mla_decode_reference

    seed = fresh_seed(seed)
    scale = (C + R) ** -0.5
    for name, lengths, garbage in STAGES:
        with seeded(seed):
            q_latent, q_pe = torch.randn(B, H, C), torch.randn(B, H, R)
            kv, k_pe = torch.randn(B, L, C), torch.randn(B, L, R)
            seqlens = torch.full((B,), L) if lengths == "full" else torch.tensor([L, 7, 1])
            past = torch.arange(L)[None, :] >= seqlens[:, None]  # [B, L]
            if garbage == "stale":
                kv[past] = 30 * torch.randn(int(past.sum()), C)
                k_pe[past] = 30 * torch.randn(int(past.sum()), R)
            elif garbage == "nan":
                kv[past], k_pe[past] = float("nan"), float("nan")
        ref = mla_decode_reference(q_latent, q_pe, kv, k_pe, seqlens, scale)
        tensors = (q_latent, q_pe, kv, k_pe, seqlens)
        got = call(decode_step, (*(t.clone() for t in tensors), scale), seed, HINT)
        got = as_tensor(got, "the output", seed).float()
        where = f" (stage: {name})"
        expect_shape(
            got,
            (B, H, C),
            "the output" + where,
            seed,
            HINT,
            known={
                (B, H, L): "those are the attention weights; multiply them into the cache",
                (B, 1, H, C): "one new token per sequence: no token dimension here",
            },
        )
        if close(got, ref, 1e-5):
            continue
        if garbage == "nan" and torch.isnan(got).any():
            raise ExerciseError(
                "your output has NaN: the cache past cache_seqlens[b] holds garbage (here NaN), "
                "and a weight of 0 times NaN is still NaN — leave those positions out of the "
                "weighted sum (zero them, or slice each sequence to its length), not only out "
                "of the softmax" + where,
                hint=HINT,
                seed=seed,
            )
        if garbage is not None:
            everything = mla_decode_reference(q_latent, q_pe, kv, k_pe, torch.full((B,), L), scale)
            diagnose(
                got,
                [
                    (
                        everything,
                        "you attended to every position of the cache; sequence b has only "
                        "cache_seqlens[b] valid ones, the rest is stale memory" + where,
                        HINT,
                    )
                ],
                1e-5,
                seed,
            )
        full = torch.full((B,), L) if lengths == "full" else seqlens
        scores, _, zeroed = _attention(q_latent, q_pe, kv, k_pe, full, scale)
        diagnose(
            got,
            [
                (
                    _attention(q_latent, q_pe * 0, kv, k_pe, full, scale)[1],
                    "the RoPE part is missing: scores add q^R · k^R to q_latent · c^KV" + where,
                    HINT,
                ),
                (
                    _attention(q_latent, q_pe, kv, k_pe, full, 1.0)[1],
                    "the softmax scale is missing: multiply the scores by softmax_scale" + where,
                    HINT,
                ),
                (
                    torch.einsum("bhl,blc->bhc", _softmax_over_heads(scores), zeroed),
                    "the softmax runs over heads; it runs over the cached positions" + where,
                    HINT,
                ),
            ],
            1e-5,
            seed,
        )
        raise ExerciseError(
            f"the output differs from mla_decode_reference: relative error "
            f"{rel_err(got, ref):.2e} (≤ 1e-5 expected)" + where,
            hint=HINT,
            seed=seed,
        )
    passed(
        "your decode step equals mla_decode_reference: full caches, ragged lengths, and NaN "
        "past each length"
    )


def _attention(q_latent, q_pe, kv, k_pe, seqlens, scale):
    """(masked scores, output, zeroed cache) of the absorbed step, for the usual mistakes."""
    valid = torch.arange(kv.shape[1])[None, :] < seqlens[:, None]
    kv = kv.masked_fill(~valid[..., None], 0.0)
    k_pe = k_pe.masked_fill(~valid[..., None], 0.0)
    s = torch.einsum("bhc,blc->bhl", q_latent, kv) + torch.einsum("bhr,blr->bhl", q_pe, k_pe)
    s = (s * scale).masked_fill(~valid[:, None, :], float("-inf"))
    return s, torch.einsum("bhl,blc->bhc", s.softmax(-1), kv), kv


def _softmax_over_heads(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 (heads) of masked scores, masked entries kept at 0."""
    return scores.masked_fill(scores.isinf(), -1e30).softmax(1).masked_fill(scores.isinf(), 0.0)


VERIFY_HINT = (
    "row 0 of main_logits is the main model's distribution for the draft's slot: accept when "
    "its argmax is the draft, and then row 1 (computed after the draft) gives one more token; "
    "on a rejection only row 0's argmax is kept"
)
V = 50


def _verify_answer(got, seed: int) -> list[int]:
    """The learner's answer as a list of ints (a list, tuple or 1-d tensor)."""
    if isinstance(got, torch.Tensor):
        got = got.flatten().tolist()
    if not isinstance(got, list | tuple) or not all(isinstance(t, int) for t in got):
        raise ExerciseError(
            f"greedy_verify should return a list of token ids (ints), got {got!r}",
            hint="return [token] or [token, token] with int(...) of each argmax",
            seed=seed,
        )
    return [int(t) for t in got]


@exercise
def check_greedy_verify(greedy_verify: Callable, *, seed: int | None = None) -> None:
    """Check ``greedy_verify(main_logits, draft) -> list of new tokens`` (notebook 10).

    ``main_logits`` [2, V] are the main model's logits from one forward over [t_{i+1}, draft]:
    row 0 predicts the draft's slot, row 1 the slot after it. Greedy verification accepts the
    draft when row 0's argmax equals it and returns ``[draft, argmax(row 1)]`` (two tokens for
    one forward); otherwise it returns ``[argmax(row 0)]`` — row 1 was computed after a wrong
    token and is thrown away. Checked on a draft that is rejected and one that is accepted,
    against ``dsv3lite.speculative_generate``'s rule. Raises ExerciseError saying what is wrong;
    prints a line when right.
    """
    seed = fresh_seed(seed)
    with seeded(seed):
        logits = torch.randn(2, 2, V)
    for case, rows in zip(("rejected", "accepted"), logits):
        first, second = int(rows[0].argmax()), int(rows[1].argmax())
        if case == "accepted":  # checked second: verifying with row 1 shows on a rejection
            draft, expected = first, [first, second]
        else:  # a draft row 1 happens to favour: verifying with the wrong row accepts it
            draft = (first + 1 + seed % (V - 1)) % V
            rows[1, draft] = rows[1].max() + 1.0
            expected = [first]
        got = call(greedy_verify, (rows.clone(), draft), seed, VERIFY_HINT)
        got = _verify_answer(got, seed)
        if got == expected:
            continue
        where = " (a draft the main model " + ("agrees with)" if case == "accepted" else "rejects)")
        if case == "accepted":
            mistakes = {
                (draft,): "an accepted draft also earns the token after it: row 1 of "
                "main_logits was computed with the draft in place, so its argmax is a second "
                "new token",
            }
        else:
            mistakes = {
                (draft, draft): "you compared the draft with row 1; row 0 is the main model's "
                "prediction for the draft's slot",
                (first, draft): "a rejected draft's forward is half wasted: row 1 was computed "
                "after the wrong token, so only row 0's argmax is kept",
                (draft,): "you kept a draft the main model rejected: its own argmax replaces it",
            }
        message = mistakes.get(tuple(got), f"expected {expected}, got {got}")
        raise ExerciseError(message + where, hint=VERIFY_HINT, seed=seed)
    passed(
        "an accepted draft gives two tokens (the draft and row 1's argmax), a rejected one "
        "gives row 0's argmax alone — speculative_generate's greedy rule"
    )
