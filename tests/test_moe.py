"""DeepSeekMoE: the gate against a per-token reference of eqs. (13)–(16), grouped experts
against a per-token loop, and the group mask."""

import pytest
import torch

from dsv3lite import ModelConfig, preset
from dsv3lite.model.moe import Gate, MoE


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
    y, routing = moe(x)
    flat = x.reshape(-1, x.shape[-1])
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
    y, _ = moe(torch.zeros(0, moe.config.hidden_size, dtype=torch.float64))
    assert y.shape == (0, moe.config.hidden_size)


def _official_gate(x, weight, config):
    """DeepSeek's inference Gate without a bias, in plain torch: groups scored by their max."""
    scores = x.float() @ weight.float().T
    scores = scores.sigmoid() if config.scoring_func == "sigmoid" else scores.softmax(-1)
    grouped = scores.view(len(x), config.n_group, -1)
    keep = grouped.amax(-1).topk(config.topk_group, -1).indices
    dropped = torch.ones(len(x), config.n_group, dtype=torch.bool).scatter_(1, keep, False)
    masked = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
    indices = masked.topk(config.num_experts_per_tok, -1).indices
    weights = scores.gather(1, indices)
    if config.scoring_func == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * config.routed_scaling_factor, indices


def _sorted(weights, indices):
    order = indices.argsort(-1)
    return weights.gather(1, order), indices.gather(1, order)


@pytest.mark.parametrize("scoring_func", ["sigmoid", "softmax"])
def test_group_score_max_routes_like_the_official_gate(scoring_func):
    config = preset("tiny", scoring_func=scoring_func, norm_topk_prob=scoring_func == "sigmoid")
    torch.manual_seed(7)
    weight = torch.randn(config.n_routed_experts, config.hidden_size) * 0.3
    x = torch.randn(256, config.hidden_size)
    routed = {}
    for rule in ("max", "top2_sum"):
        gate = Gate(config.replace(group_score=rule))
        gate.weight.data = weight  # the bias stays zero: DeepSeek's gate has none here
        routing = gate(x)
        routed[rule] = _sorted(routing.weights, routing.indices)
    ref_w, ref_i = _sorted(*_official_gate(x, weight, config))
    got_w, got_i = routed["max"]
    assert torch.equal(got_i, ref_i)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=1e-7)
    differ = (routed["top2_sum"][1] != ref_i).any(-1)
    assert differ.sum() > 10  # the two rules pick other groups for many tokens


def test_group_score_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match=r"ModelConfig.group_score must be 'top2_sum' or 'max'"):
        preset("tiny", group_score="sum")
    preset("tiny", group_score="max").save(tmp_path)
    assert ModelConfig.load(tmp_path).group_score == "max"
    assert preset("tiny").to_dict()["group_score"] == "top2_sum"
    preset("tiny", n_group=16, topk_group=4, group_score="max")  # one expert a group: fine
    with pytest.raises(ValueError, match="every group needs at least 2"):
        preset("tiny", n_group=16, topk_group=4)


@pytest.mark.parametrize("n_tokens", [0, 1, 37])
def test_gather_matches_indexing_forward_and_backward(n_tokens):
    """moe.gather and the sorted weights (index_select, for its cheaper backward) equal
    autograd through plain indexing, in fp64 on fresh random routing."""
    from dsv3lite.model.moe import Routing, gather, sort_pairs

    k, n_experts, hidden = 3, 8, 5
    scores = torch.rand(n_tokens, n_experts, dtype=torch.float64)
    indices = torch.rand(n_tokens, n_experts).argsort(dim=1)[:, :k]
    weights = torch.rand(n_tokens, k, dtype=torch.float64, requires_grad=True)
    load = torch.bincount(indices.flatten(), minlength=n_experts)
    pairs = sort_pairs(Routing(weights=weights, indices=indices, scores=scores, load=load))
    order = indices.flatten().argsort(stable=True)
    assert torch.equal(pairs.token, order // k)
    assert torch.equal(indices.flatten()[order].bincount(minlength=n_experts), load)
    x = torch.randn(n_tokens, hidden, dtype=torch.float64, requires_grad=True)
    rows = gather(x, pairs)
    reference = x[pairs.token]
    assert torch.equal(rows, reference)
    assert torch.equal(pairs.weight, weights.flatten()[order])
    grad_rows, grad_w = torch.randn_like(rows), torch.randn_like(pairs.weight)
    got = torch.autograd.grad(
        (rows * grad_rows).sum() + (pairs.weight * grad_w).sum(), [x, weights]
    )
    want = torch.autograd.grad(
        (reference * grad_rows).sum() + (weights.flatten()[order] * grad_w).sum(),
        [x, weights],
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
