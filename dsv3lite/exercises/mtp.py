"""Exercise of notebook 03: the MTP module's input, eq. (21) (report §2.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import preset
from ..model.mtp import MTPModule
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
    "eq. (21): normalise the embedding with mtp.enorm and h_prev with mtp.hnorm, concatenate "
    "them along the last dimension (embedding first), and project with M_k, mtp.eh_proj"
)


@exercise
def check_mtp_combine(mtp_combine: Callable, *, seed: int | None = None) -> None:
    """Check ``mtp_combine(mtp, h_prev, emb_next) -> h'``, eq. (21).

    ``mtp`` is a ``dsv3lite.model.MTPModule`` (its ``enorm``, ``hnorm`` and the projection M_k,
    ``eh_proj``); ``h_prev`` [B, T, hidden] is the previous depth's representation h^{k-1}_i and
    ``emb_next`` [B, T, hidden] the embedding of token i+k. The answer [B, T, hidden] is
    M_k applied to the two normed inputs, concatenated embedding first (as the release is
    served). Checked against ``MTPModule.combine``, with norm weights made unequal and inputs of
    different magnitudes so that a swapped or missing norm shows. Raises ExerciseError saying
    what is wrong; prints a line when right.
    """
    seed = fresh_seed(seed)
    config = preset("tiny")
    with seeded(seed):
        mtp = MTPModule(config, layer_idx=config.num_hidden_layers)
        with torch.no_grad():
            mtp.enorm.weight.copy_(1 + 0.5 * torch.randn(config.hidden_size))
            mtp.hnorm.weight.copy_(1 + 0.5 * torch.randn(config.hidden_size))
        h_prev = 3.0 * torch.randn(2, 6, config.hidden_size)
        emb_next = 0.02 * torch.randn(2, 6, config.hidden_size)
    with torch.no_grad():
        ref = mtp.combine(h_prev, emb_next)
        got = call(mtp_combine, (mtp, h_prev.clone(), emb_next.clone()), seed, HINT)
        got = as_tensor(got, "h'", seed).float()
        expect_shape(
            got,
            tuple(ref.shape),
            "h'",
            seed,
            HINT,
            known={
                (2, 6, 2 * config.hidden_size): "that is the concatenation; project it back to "
                "hidden_size with M_k (mtp.eh_proj)",
            },
        )
        if close(got, ref, 1e-5):
            passed("h' = M_k [enorm(emb); hnorm(h)] matches MTPModule.combine (eq. 21)")
            return
        e, h, proj = mtp.enorm, mtp.hnorm, mtp.eh_proj
        diagnose(
            got,
            [
                (
                    proj(torch.cat([h(h_prev), e(emb_next)], -1)),
                    "the two halves are in the wrong order: the release puts the normed "
                    "embedding first, then the normed hidden state",
                    HINT,
                ),
                (
                    proj(torch.cat([h(emb_next), e(h_prev)], -1)),
                    "the norms are swapped: enorm is for the embedding, hnorm for h_prev",
                    HINT,
                ),
                (
                    proj(torch.cat([emb_next, h_prev], -1)),
                    "neither input is normalised: eq. (21) applies RMSNorm to both before "
                    "concatenating (their scales differ a lot: here |h| ≈ 3, |emb| ≈ 0.02)",
                    HINT,
                ),
                (
                    proj(torch.cat([e(emb_next), h_prev], -1)),
                    "h_prev is not normalised: apply mtp.hnorm to it",
                    HINT,
                ),
                (
                    proj(torch.cat([emb_next, h(h_prev)], -1)),
                    "the embedding is not normalised: apply mtp.enorm to it",
                    HINT,
                ),
            ],
            1e-5,
            seed,
        )
    raise ExerciseError(
        f"h' differs from MTPModule.combine: relative error {rel_err(got, ref):.2e}",
        hint=HINT,
        seed=seed,
    )


LOSS_HINT = (
    "depth k at position i predicts t_{i+k+1}: score mtp_logits [B, T−k, V] against "
    "labels[:, k:] (labels are already shifted by one), with a mean cross-entropy over the "
    "B·(T−k) terms: F.cross_entropy(mtp_logits.flatten(0, 1), labels[:, k:].flatten())"
)


@exercise
def check_mtp_loss(mtp_loss: Callable, *, seed: int | None = None) -> None:
    """Check ``mtp_loss(mtp_logits, labels, k) -> L^k_MTP``, eq. (24) as the model computes it.

    ``labels`` [B, T] are the next-token targets y_i = t_{i+1} of inputs t_{1:T} (the trainer's
    batches); ``mtp_logits`` [B, T−k, V] are depth k's predictions at positions 1 … T−k, each
    for t_{i+k+1}. The answer is the mean cross-entropy over those B·(T−k) terms (the model's
    normalisation; eq. 24 writes 1/T). Checked for k = 1 and k = 2 against the loss
    ``DeepSeekV3`` returns for training. Raises ExerciseError saying what is wrong; prints a
    line when right."""
    from ..model.losses import cross_entropy

    seed = fresh_seed(seed)
    B, T, V = 2, 12, 50
    for k in (1, 2):
        with seeded(seed + k):
            logits = 2.0 * torch.randn(B, T - k, V)
            labels = torch.randint(0, V, (B, T))
        ref = cross_entropy(logits, labels[:, k:])
        got = call(mtp_loss, (logits.clone(), labels.clone(), k), seed, LOSS_HINT)
        got = as_tensor(got, "the loss", seed).float()
        if got.numel() != 1:
            raise ExerciseError(
                f"the loss has shape {list(got.shape)}; expected one number (k = {k})",
                hint="average the per-position terms: .mean()",
                seed=seed,
            )
        got = got.reshape(())
        if close(got, ref, 1e-5):
            continue
        terms = -logits.log_softmax(-1).gather(-1, labels[:, k:, None]).squeeze(-1)
        mistakes = [
            (
                cross_entropy(logits, labels[:, : T - k]),
                f"you scored depth {k} against labels[:, :T-k], the main head's targets: "
                "depth k at position i predicts t_{i+k+1}, which is labels[:, k:]",
                LOSS_HINT,
            ),
            (
                terms.sum() / (B * T),
                "you divided by T, as eq. (24) is typeset; the model averages over the T−k "
                "positions it scores (the factor (T−k)/T is absorbed by λ)",
                "use .mean() over the B·(T−k) terms",
            ),
            (terms.sum(), "you summed the terms; L^k_MTP is their mean", "use .mean()"),
            (
                -logits.gather(-1, labels[:, k:, None]).mean(),
                "you averaged the raw logits of the targets; the loss is −log softmax",
                LOSS_HINT,
            ),
        ]
        if k > 1:
            mistakes.append(
                (
                    cross_entropy(logits, labels[:, k - 1 : T - 1]),
                    "off by one: labels[:, k-1:-1] are t_{i+k}, the tokens module k is "
                    "given; it predicts the one after, labels[:, k:]",
                    LOSS_HINT,
                )
            )
        diagnose(got, mistakes, 1e-5, seed)
        raise ExerciseError(
            f"L^{k}_MTP = {float(got):.4f}, expected {float(ref):.4f}", hint=LOSS_HINT, seed=seed
        )
    passed("L^k_MTP matches the model's loss for depths k = 1 and k = 2 (eq. 24)")
