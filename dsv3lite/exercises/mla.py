"""Exercise of notebook 01: the absorbed query q^C·W^UK (report §2.1.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import preset
from ..model.mla import MLA
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
    "kv_b_proj.weight stacks, head by head, qk_nope_head_dim rows of W^UK then v_head_dim rows "
    "of W^UV, each kv_lora_rank wide: view it as [H, nope + v, kv_lora_rank], keep each head's "
    "W^UK rows, and contract them with q_nope over d_h, head by head (torch.einsum)"
)


@exercise
def check_absorbed_query(absorbed_query: Callable, *, seed: int | None = None) -> None:
    """Check ``absorbed_query(mla, q_nope) -> q_latent``.

    ``mla`` is a ``dsv3lite.model.MLA``; ``q_nope`` [B, T, H, qk_nope_head_dim] is the
    position-free part of the queries. The answer q_latent [B, T, H, kv_lora_rank] is q_nope
    with W^UK folded in, so that q_latent · c^KV_j equals q^C · k^C_j: attention can score the
    latent cache directly. Checked against the package's absorbed path on a fresh MLA with
    random weights, whose head sizes all differ (so a mixed-up dimension shows), and against the
    naive path's scores. Raises ExerciseError saying what is wrong; prints a line when right.
    """
    seed = fresh_seed(seed)
    config = preset(
        "tiny", num_attention_heads=3, qk_nope_head_dim=24, v_head_dim=40, kv_lora_rank=48
    )
    with seeded(seed):
        mla = MLA(config, layer_idx=0)
        q_nope = torch.randn(2, 5, config.num_attention_heads, config.qk_nope_head_dim)
        latent = torch.randn(2, 7, config.kv_lora_rank)  # c^KV of 7 cached tokens
    h, nope, v, c = mla.n_heads, mla.nope, mla.v_dim, mla.kv_lora_rank
    w = mla.kv_b_proj.weight.detach().view(h, nope + v, c)
    ref = torch.einsum("bshd,hdc->bshc", q_nope, w[:, :nope])  # as MLA._absorbed computes it

    with torch.no_grad():
        got = call(absorbed_query, (mla, q_nope.clone()), seed, HINT)
    got = as_tensor(got, "q_latent", seed).float()
    expect_shape(
        got,
        tuple(ref.shape),
        "q_latent",
        seed,
        HINT,
        known={
            tuple(q_nope.shape): "that is q_nope's own shape; the absorbed query lives in the "
            f"latent space, kv_lora_rank = {c} wide",
            (2, 5, c, h): "heads and latent channels are swapped",
            (2, 5, h, v): "v_head_dim wide: that is the W^UV half of kv_b_proj",
        },
    )
    if not close(got, ref, 1e-5):
        head_major = mla.kv_b_proj.weight.detach().view(nope + v, h, c).transpose(0, 1)
        all_uk_first = mla.kv_b_proj.weight.detach()[: h * nope].view(h, nope, c)
        diagnose(
            got,
            [
                (
                    ref * mla.softmax_scale,
                    "q_latent is scaled by the softmax scale",
                    "leave it out here: the attention applies it to the summed scores",
                ),
                (
                    torch.einsum("bshd,hdc->bshc", q_nope, head_major[:, :nope]),
                    "you read kv_b_proj.weight's rows as [row within a head, head]; they are "
                    "[head, row within the head]",
                    HINT,
                ),
                (
                    torch.einsum("bshd,hdc->bshc", q_nope, all_uk_first),
                    "you took the first H·qk_nope_head_dim rows of kv_b_proj.weight as W^UK; "
                    "its rows come head by head, [W^UK_h ; W^UV_h] for each head h in turn",
                    HINT,
                ),
            ],
            1e-5,
            seed,
        )
        raise ExerciseError(
            f"q_latent differs from the package's absorbed path: relative error "
            f"{rel_err(got, ref):.2e} (at most 1e-5 expected)",
            hint=HINT,
            seed=seed,
        )
    # what absorption is for: latent scores equal the naive path's q^C · k^C
    k_nope = (latent @ w[:, :nope].reshape(h * nope, c).t()).view(2, 7, h, nope)
    naive = torch.einsum("bshd,bthd->bsht", q_nope, k_nope)
    absorbed = torch.einsum("bshc,btc->bsht", got, latent)
    if rel_err(absorbed, naive) > 1e-4:  # guards the claim printed below
        raise ExerciseError(
            "q_latent · c^KV does not reproduce the naive scores q^C · k^C", hint=HINT, seed=seed
        )
    passed(
        "q_latent = q^C·W^UK matches the package's absorbed path, and q_latent · c^KV "
        "equals the naive scores q^C · k^C"
    )
