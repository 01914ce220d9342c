"""Exercise of notebook 02: group-limited top-k routing with the balancing bias (eqs. 13, 16)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import preset
from ..model.moe import Gate
from ..testing import rel_err
from ._check import (
    ExerciseError,
    as_tensor,
    call,
    close,
    exercise,
    expect_shape,
    fresh_seed,
    passed,
    seeded,
)

HINT = (
    "biased = scores + bias; view it as [N, n_group, experts per group]; score each group by "
    "the sum of its two best biased scores; keep the topk_group best groups, set the others to "
    "-inf; take the top-k of what is left; the weights are the *unbiased* scores of the chosen "
    "experts, divided by their sum"
)

# (name, n_experts, n_group, topk_group, k, bias): from the plain top-k to the subtle cases
CASES = (
    ("plain top-k (one group, no bias)", 16, 1, 1, 4, "zero"),
    ("one group, with a bias", 16, 1, 1, 4, "random"),
    ("8 groups, keep 3, no bias", 32, 8, 3, 6, "zero"),
    ("8 groups, keep 3, with a bias", 32, 8, 3, 6, "random"),
    ("8 groups, keep 3, a bias that makes every biased score negative", 32, 8, 3, 6, "negative"),
)


def reference(
    logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The package's gate on sigmoid(logits): a Gate whose weight is the identity matrix, so
    that its affinities are exactly ``logits.sigmoid()``."""
    n_experts = logits.shape[1]
    config = preset(
        "tiny",
        hidden_size=n_experts,
        n_routed_experts=n_experts,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=k,
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        scoring_func="sigmoid",
    )
    gate = Gate(config)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(n_experts))
        gate.e_score_correction_bias.copy_(bias)
        routing = gate(logits)
    return routing.indices, routing.weights


def _select(biased: torch.Tensor, n_group: int, topk_group: int, k: int, group_by, fill):
    """Group-limited top-k with a chosen group score and mask value: the reference's shape,
    used to build the usual wrong answers."""
    n = biased.shape[0]
    grouped = biased.view(n, n_group, -1)
    keep = group_by(grouped).topk(topk_group, dim=-1).indices
    drop = torch.ones(n, n_group, dtype=torch.bool).scatter_(1, keep, False)
    return grouped.masked_fill(drop[..., None], fill).flatten(1).topk(k, dim=-1).indices


def _top2(g: torch.Tensor) -> torch.Tensor:
    return g.topk(2, dim=-1).values.sum(-1)


def _same_choice(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.long().sort(dim=-1).values, b.long().sort(dim=-1).values)


def _selection_mistake(indices, scores, bias, n_group, topk_group, k):
    """Which usual wrong selection ``indices`` is, as (message, hint), or None."""
    biased = scores + bias
    ninf = float("-inf")
    mistakes = [
        (
            _select(biased, 1, 1, k, _top2, ninf),
            "you took the top-k over all experts: a token may only use experts of its "
            f"topk_group={topk_group} best groups",
        ),
        (
            _select(scores, n_group, topk_group, k, _top2, ninf),
            "you selected with the unbiased scores s; selection uses s + b (eq. 16) — the bias "
            "is what balancing adjusts",
        ),
        (
            _select_groups_unbiased(scores, biased, n_group, topk_group, k),
            "you ranked the groups with the unbiased scores; groups are ranked with the biased "
            "scores too",
        ),
        (
            _select(biased, n_group, topk_group, k, lambda g: g.amax(-1), ninf),
            "you ranked each group by its best biased score; DeepSeek-V3 ranks a group by the "
            "sum of its two best",
        ),
        (
            _select(biased, n_group, topk_group, k, lambda g: g.sum(-1), ninf),
            "you ranked each group by the sum of all its biased scores; DeepSeek-V3 ranks a "
            "group by the sum of its two best",
        ),
        (
            _select(biased, n_group, topk_group, k, _top2, 0.0),
            "you masked the dropped groups with 0.0: when every biased score is negative, 0.0 "
            "beats them and experts of dropped groups win. Mask with -inf (as the release does)",
        ),
    ]
    for answer, message in mistakes:
        if _same_choice(indices, answer):
            return message
    return None


def _select_groups_unbiased(scores, biased, n_group, topk_group, k):
    """Groups chosen on the unbiased scores, experts on the biased ones."""
    n = scores.shape[0]
    keep = _top2(scores.view(n, n_group, -1)).topk(topk_group, dim=-1).indices
    drop = torch.ones(n, n_group, dtype=torch.bool).scatter_(1, keep, False)
    masked = biased.view(n, n_group, -1).masked_fill(drop[..., None], float("-inf"))
    return masked.flatten(1).topk(k, dim=-1).indices


@exercise
def check_group_limited_topk(group_limited_topk: Callable, *, seed: int | None = None) -> None:
    """Check ``group_limited_topk(scores, bias, n_group, topk_group, k) -> (indices, weights)``.

    ``scores`` [N, E] are sigmoid affinities s_{i,t}, ``bias`` [E] the balancing bias b_i;
    experts form ``n_group`` equal groups of consecutive ids. The answer: ``indices`` [N, k]
    (any order within a row) — the top-k of s + b inside the ``topk_group`` groups whose two
    best s + b sum highest — and ``weights`` [N, k], the unbiased s of those experts divided by
    their sum (eq. 13), position for position with ``indices``. Checked against
    ``dsv3lite.model.moe.Gate`` on five cases, from a plain top-k to biased scores that are all
    negative. Raises ExerciseError saying what is wrong; prints a line when right.
    """
    seed = fresh_seed(seed)
    for name, n_experts, n_group, topk_group, k, bias_kind in CASES:
        with seeded(seed):
            logits = torch.randn(64, n_experts) * 2
            bias = {
                "zero": torch.zeros(n_experts),
                "random": torch.randn(n_experts) * 0.2,
                "negative": torch.randn(n_experts) * 0.05 - 1.5,
            }[bias_kind]
        scores = logits.sigmoid()
        ref_idx, ref_w = reference(logits, bias, n_group, topk_group, k)
        got = call(
            group_limited_topk, (scores.clone(), bias.clone(), n_group, topk_group, k), seed, HINT
        )
        if not isinstance(got, tuple | list) or len(got) != 2:
            raise ExerciseError(
                f"expected a pair (indices, weights), got {type(got).__name__}",
                hint="return indices, weights",
                seed=seed,
            )
        indices = as_tensor(got[0], "indices", seed)
        weights = as_tensor(got[1], "weights", seed).float()
        where = f" (case: {name}, {n_experts} experts, n_group={n_group}, topk_group={topk_group}, k={k})"
        for what, t in (("indices", indices), ("weights", weights)):
            expect_shape(
                t,
                (64, k),
                what + where,
                seed,
                HINT,
                known={(64, n_experts): "one value per expert; return only the k chosen ones"},
            )
        if indices.is_floating_point():
            raise ExerciseError(
                "indices are floating-point numbers" + where,
                hint="return expert ids as integers: topk(...).indices",
                seed=seed,
            )
        if not _same_choice(indices, ref_idx):
            message = _selection_mistake(indices, scores, bias, n_group, topk_group, k)
            if message is None:
                wrong = int((indices.sort(-1).values != ref_idx.sort(-1).values).any(-1).sum())
                message = f"{wrong} of 64 tokens chose different experts from the package's gate"
            raise ExerciseError(message + where, hint=HINT, seed=seed)
        # align both answers by expert id before comparing the weights
        mine = weights.gather(1, indices.long().argsort(-1))
        ref = ref_w.gather(1, ref_idx.argsort(-1))
        if not close(mine, ref, 1e-5):
            chosen = scores.gather(1, indices.long().sort(-1).values)
            biased = chosen + bias[indices.long().sort(-1).values]
            if close(mine, biased / biased.sum(-1, keepdim=True), 1e-5):
                message = (
                    "your weights differ when the bias is non-zero — did you use the biased "
                    "scores for selection and the unbiased ones for weights?"
                )
            elif close(mine, chosen, 1e-5):
                message = "your weights are the raw scores; eq. (13) divides them by their sum"
            elif close(mine, chosen.softmax(-1), 1e-5):
                message = "your weights are a softmax of the scores; eq. (13) divides by the sum"
            else:
                message = f"weights differ from the gate's: relative error {rel_err(mine, ref):.2e}"
            raise ExerciseError(
                message + where,
                hint="weights = s.gather(1, indices); weights / weights.sum(-1, keepdim=True)",
                seed=seed,
            )
    passed(
        "group-limited top-k chooses the experts DeepSeek-V3's gate chooses, with its weights, "
        f"in all {len(CASES)} cases"
    )


MAXVIO_HINT = (
    "MaxVio = (the largest load) / (the mean load) − 1; convert the counts to float first "
    "(load.float()), since the mean of an integer tensor is not defined"
)


@exercise
def check_max_violation(max_violation: Callable, *, seed: int | None = None) -> None:
    """Check ``max_violation(load) -> float``: MaxVio of one MoE layer's per-expert token
    counts ``load`` [E] (an int64 tensor), max_i load_i / mean(load) − 1 — 0 for a perfectly
    balanced layer, E/K − 1 when every token picks the same K experts. Checked against
    ``dsv3lite.train.max_violation`` on balanced, skewed and collapsed loads. Raises
    ExerciseError saying what is wrong; prints a line when right."""
    from ..train import max_violation as reference_maxvio

    seed = fresh_seed(seed)
    with seeded(seed):
        skewed = torch.randint(0, 200, (16,))
    collapsed = torch.zeros(16, dtype=torch.long)
    collapsed[:4] = 512
    cases = (
        ("balanced", torch.full((16,), 128, dtype=torch.long)),
        ("skewed", skewed),
        ("collapsed onto 4 of 16", collapsed),
    )
    for name, load in cases:
        got = call(max_violation, (load.clone(),), seed, MAXVIO_HINT)
        value = float(as_tensor(got, "MaxVio", seed).float().reshape(-1)[0])
        ref = reference_maxvio(load)
        if abs(value - ref) <= 1e-5 * max(1.0, abs(ref)):
            continue
        f = load.float()
        known = {
            "you returned max / mean without the − 1: a balanced layer must give 0": (
                f.max() / f.mean()
            ),
            "you divided by the total load, not the mean": f.max() / f.sum() - 1,
            "you measured (max − min) / mean; MaxVio compares the busiest expert with the mean "
            "only": (f.max() - f.min()) / f.mean(),
            "you divided by the least loaded expert, not the mean": f.max() / f.min() - 1,
        }
        message = next((m for m, v in known.items() if abs(value - float(v)) < 1e-5), None)
        raise ExerciseError(
            (message or f"MaxVio {value:.4f}, expected {ref:.4f}") + f" (case: {name} load)",
            hint=MAXVIO_HINT,
            seed=seed,
        )
    passed("MaxVio matches dsv3lite.train.max_violation on balanced, skewed and collapsed loads")
