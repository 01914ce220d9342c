"""DeepSeekMoE: the gate against a per-token reference of eqs. (13)–(16), grouped experts
against a per-token loop, and the group mask."""

import pytest
import torch

from dsv3lite import preset
from dsv3lite.model.moe import MoE


def _moe(seed=0, **overrides):
    torch.manual_seed(seed)
    config = preset("tiny", **overrides)
    moe = MoE(config).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe


def _reference_route(moe, x_t):
    """One token, in plain Python over fp64: groups, top-k, weights (eqs. 13–16)."""
    c = moe.config
    logits = moe.gate.weight.double() @ x_t.double()
    s = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(-1)
    biased = (s + moe.gate.e_score_correction_bias.double()).tolist()
    per = c.n_routed_experts // c.n_group
    groups = sorted(
        range(c.n_group),
        key=lambda g: -sum(sorted(biased[g * per : (g + 1) * per])[-2:]),
    )[: c.topk_group]
    allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
    chosen = sorted(allowed, key=lambda e: -biased[e])[: c.num_experts_per_tok]
    w = s[chosen]
    if c.norm_topk_prob:
        w = w / w.sum()
    return chosen, w * c.routed_scaling_factor


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": False},
        {"n_group": 1, "topk_group": 1},
        {"routed_scaling_factor": 2.5},
    ],
)
def test_gate_matches_per_token_reference(overrides):
    moe = _moe(**overrides)
    x = torch.randn(40, moe.config.hidden_size, dtype=torch.float64)
    routing = moe.gate(x)
    for t in range(x.shape[0]):
        chosen, w = _reference_route(moe, x[t])
        order = routing.indices[t].argsort()
        got_idx = routing.indices[t][order].tolist()
        assert got_idx == sorted(chosen)
        ref = dict(zip(chosen, w.tolist()))
        got = routing.weights[t][order].double()
        torch.testing.assert_close(
            got, torch.tensor([ref[e] for e in got_idx]).double(), rtol=1e-5, atol=1e-7
        )
    assert routing.load.tolist() == torch.bincount(routing.indices.flatten(), minlength=16).tolist()


def test_dropped_groups_never_win():
    """With every biased score negative, masking dropped groups with 0.0 would let them win."""
    moe = _moe(seed=3)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(-5.0)
    x = torch.randn(64, moe.config.hidden_size, dtype=torch.float64)
    routing = moe.gate(x)
    c = moe.config
    per = c.n_routed_experts // c.n_group
    biased = routing.scores + moe.gate.e_score_correction_bias
    group_scores = biased.view(64, c.n_group, per).topk(2, dim=-1).values.sum(-1)
    kept = group_scores.topk(c.topk_group, dim=-1).indices
    chosen_groups = routing.indices // per
    for t in range(64):
        assert set(chosen_groups[t].tolist()) <= set(kept[t].tolist())


def test_bias_steers_selection_but_not_weights():
    moe = _moe(seed=4, n_group=1, topk_group=1)
    x = torch.randn(32, moe.config.hidden_size, dtype=torch.float64)
    before = moe.gate(x)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[0] = 10.0  # expert 0 now always chosen
    after = moe.gate(x)
    assert (after.indices == 0).any(dim=1).all()
    torch.testing.assert_close(after.scores, before.scores)  # affinities unchanged
    pos = (after.indices == 0).nonzero()
    torch.testing.assert_close(  # expert 0's unnormalised weight is its own affinity s_0,t
        (after.weights / after.weights.sum(1, keepdim=True))[pos[:, 0], pos[:, 1]],
        after.scores[:, 0] / after.scores.gather(1, after.indices).sum(1),
    )


def test_grouped_experts_equal_a_per_token_loop():
    moe = _moe(seed=5)
    x = torch.randn(3, 11, moe.config.hidden_size, dtype=torch.float64)
    y = moe(x)
    flat = x.reshape(-1, x.shape[-1])
    routing = moe.last_routing
    ref = torch.stack(
        [
            moe.shared_experts(flat[t])
            + sum(
                w * moe.experts[e](flat[t])
                for e, w in zip(routing.indices[t].tolist(), routing.weights[t])
            )
            for t in range(flat.shape[0])
        ]
    ).view_as(x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


def test_zero_tokens_give_an_empty_result():
    moe = _moe()
    y = moe(torch.zeros(0, moe.config.hidden_size, dtype=torch.float64))
    assert y.shape == (0, moe.config.hidden_size)
