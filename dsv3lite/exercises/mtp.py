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
