"""Exercises of notebook 01 (report §2.1.1): the absorbed query q^C·W^UK, and the absorbed
values W^UV·(Σ_j p_ij c^KV_j)."""

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


VALUES_HINT = (
    "average the cached latents first, o_latent = Σ_j p_ij c^KV_j (probs [B, H, T, S] against "
    "c_kv [B, S, kv_lora_rank]), then apply each head's W^UV once: kv_b_proj.weight viewed as "
    "[H, nope + v, kv_lora_rank] holds, per head, qk_nope_head_dim rows of W^UK and then "
    "v_head_dim rows of W^UV"
)


@exercise
def check_absorbed_values(absorbed_values: Callable, *, seed: int | None = None) -> None:
    """Check ``absorbed_values(mla, probs, c_kv) -> o``.

    ``probs`` [B, H, T, S] are the attention weights of T queries over S cached tokens,
    ``c_kv`` [B, S, kv_lora_rank] the cached latents. The answer o [B, T, H, v_head_dim] is
    each head's output Σ_j p_ij v^C_j computed without rebuilding any value: since
    v^C_j = W^UV c_j, it is W^UV (Σ_j p_ij c_j). Checked against the naive path's values on a
    fresh MLA whose head sizes all differ, so a mixed-up dimension shows. Raises ExerciseError
    saying what is wrong; prints a line when right.
    """
    seed = fresh_seed(seed)
    config = preset(
        "tiny", num_attention_heads=3, qk_nope_head_dim=24, v_head_dim=40, kv_lora_rank=48
    )
    b, t, s = 2, 5, 7
    with seeded(seed):
        mla = MLA(config, layer_idx=0)
        probs = torch.randn(b, config.num_attention_heads, t, s).softmax(-1)
        c_kv = torch.randn(b, s, config.kv_lora_rank)
    h, nope, v, c = mla.n_heads, mla.nope, mla.v_dim, mla.kv_lora_rank
    weight = mla.kv_b_proj.weight.detach()
    w = weight.view(h, nope + v, c)
    v_c = torch.einsum("bsc,hdc->bshd", c_kv, w[:, nope:])  # the naive path's values (eq. 5)
    ref = torch.einsum("bhts,bshd->bthd", probs, v_c)

    with torch.no_grad():
        got = call(absorbed_values, (mla, probs.clone(), c_kv.clone()), seed, VALUES_HINT)
    got = as_tensor(got, "o", seed).float()
    expect_shape(
        got,
        tuple(ref.shape),
        "o",
        seed,
        VALUES_HINT,
        known={
            (b, t, h, c): "that is o_latent, still kv_lora_rank wide: apply W^UV to it",
            (b, t, h, nope): "qk_nope_head_dim wide: you applied the W^UK half of kv_b_proj",
            (b, h, t, v): "heads and query positions are swapped: o is [B, T, H, v_head_dim]",
        },
    )
    if not close(got, ref, 1e-5):
        head_major = weight.view(nope + v, h, c).transpose(0, 1)
        uv_last = weight[h * nope :].view(h, v, c)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
        diagnose(
            got,
            [
                (
                    torch.einsum("bthc,hdc->bthd", o_latent, head_major[:, nope:]),
                    "you read kv_b_proj.weight's rows as [row within a head, head]; they are "
                    "[head, row within the head]",
                    VALUES_HINT,
                ),
                (
                    torch.einsum("bthc,hdc->bthd", o_latent, uv_last),
                    "you took the last H·v_head_dim rows of kv_b_proj.weight as W^UV; its rows "
                    "come head by head, [W^UK_h ; W^UV_h] for each head h in turn",
                    VALUES_HINT,
                ),
            ],
            1e-5,
            seed,
        )
        raise ExerciseError(
            f"o differs from the naive path's Σ_j p_ij v^C_j: relative error "
            f"{rel_err(got, ref):.2e} (at most 1e-5 expected)",
            hint=VALUES_HINT,
            seed=seed,
        )
    passed(
        "o = W^UV (Σ_j p_ij c^KV_j) equals the naive path's Σ_j p_ij v^C_j, with no value "
        "ever rebuilt"
    )
