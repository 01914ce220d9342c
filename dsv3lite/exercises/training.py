"""Exercise of notebook 08: the auxiliary-loss-free bias update (report §2.1.2)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..train.balance import update_bias
from ._check import (
    ExerciseError,
    NotAttempted,
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
    "every expert moves by exactly γ towards balance, b_i ← b_i + γ · sign(mean load − load_i); "
    "the load comes as integers: take its mean on a float copy"
)


def balanced_loads(n_experts: int = 8, mean: int = 10) -> torch.Tensor:
    """Integer loads [n_experts] around ``mean`` whose mean is exactly ``mean``, with one expert
    exactly at it (sign 0: its bias must not move). Uses torch's global generator."""
    d = torch.randint(-mean, mean + 1, (n_experts - 2,))
    d = torch.cat([torch.tensor([0, -int(d.sum())]), d])
    return (mean + d)[torch.randperm(n_experts)].clamp_min(0)


@exercise
def check_bias_update(bias_update: Callable, *, seed: int | None = None) -> None:
    """Check ``bias_update(bias, load, gamma) -> new bias`` for one MoE layer.

    ``bias`` [E] float32 is the gate's ``e_score_correction_bias``, ``load`` [E] the number of
    tokens each expert received this step (an integer tensor, as the gate counts them),
    ``gamma`` the bias update speed γ. The answer [E] is b_i + γ · sign(mean load − load_i):
    overloaded experts become less attractive to the selection, underloaded ones more, and an
    expert exactly at the mean keeps its bias. Returning the updated input (changed in place)
    is fine. Checked against ``dsv3lite.train.balance.update_bias``. Raises ExerciseError saying
    what is wrong; prints a line when right.
    """
    seed = fresh_seed(seed)
    with seeded(seed):
        bias = torch.randn(8) * 0.01
        load = balanced_loads()
        while load.sum() != 80:  # the clamp moved the mean: draw again
            load = balanced_loads()
    gamma = 1e-3
    layer = SimpleNamespace(gate=SimpleNamespace(e_score_correction_bias=bias.clone()))
    update_bias([layer], [load], gamma)
    ref = layer.gate.e_score_correction_bias
    mine = bias.clone()
    got = call(bias_update, (mine, load.clone(), gamma), seed, HINT, returns_none=True)
    got = mine if got is None and not torch.equal(mine, bias) else got
    if got is None:  # returned None and left the bias unchanged: the stub
        raise NotAttempted
    got = as_tensor(got, "the new bias", seed).float()
    expect_shape(got, tuple(ref.shape), "the new bias", seed, HINT)
    if close(got, ref, 1e-6):
        passed("the bias moves by ±γ against the load, as dsv3lite.train.balance.update_bias")
        return
    lf = load.float()
    diagnose(
        got,
        [
            (
                bias,
                "the bias did not change",
                HINT,
            ),
            (
                bias + gamma * torch.sign(lf - lf.mean()),
                "the sign is reversed: an overloaded expert (load above the mean) must become "
                "*less* attractive, so its bias goes down",
                HINT,
            ),
            (
                bias + gamma * (lf.mean() - lf),
                "the step is proportional to the violation; the rule uses only its sign, so "
                "every expert moves by exactly γ",
                HINT,
            ),
            (
                bias + gamma * (lf.mean() - lf) / lf.mean(),
                "the step is proportional to the relative violation; the rule uses only its "
                "sign, so every expert moves by exactly γ",
                HINT,
            ),
            (
                bias + torch.where(lf > lf.mean(), -gamma, gamma),
                "an expert exactly at the mean load moved; sign(0) = 0 keeps its bias",
                HINT,
            ),
        ],
        1e-6,
        seed,
    )
    raise ExerciseError(
        f"the new bias differs from update_bias's: expected {ref.tolist()}, got {got.tolist()}",
        hint=HINT,
        seed=seed,
    )
