"""The model: naive == absorbed MLA, cached decode == full forward, MTP by its equations, the
losses and routing it returns, errors."""

import pytest
import torch

from dsv3lite import DeepSeekV3, preset
from dsv3lite.testing import rel_err

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip

CONFIGS = {
    "tiny": {},
    "no-q-lora": {"q_lora_rank": None},
    "yarn-half-split": {"rope_scaling": YARN, "rope_interleave": False},
    "softmax-gate": {"scoring_func": "softmax", "n_group": 1, "topk_group": 1},
}


def _model(overrides, seed=0):
    torch.manual_seed(seed)
    model = DeepSeekV3(preset("tiny", **overrides)).eval()
    for moe in model.moe_layers():  # a non-zero bias, so selection and weights differ
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_absorbed_equals_naive(name):
    model = _model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        naive = model(ids).logits
        model.attn_impl = "absorb"
        absorbed = model(ids).logits
    assert rel_err(absorbed, naive) < 1e-5


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_equals_full_forward(name, impl):
    model = _model(CONFIGS[name], seed=1)
    model.attn_impl = impl
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(3, 24)
        chunks = [(0, 9), (9, 14)] + [(t, t + 1) for t in range(14, 20)]  # prefill, then tokens
        steps = [model(ids[:, a:b], cache=cache).logits for a, b in chunks]
    assert cache.seq_len == 20
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_latent_cache_holds_kv_lora_rank_plus_rope_values_per_token():
    model = _model({})
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 10))
    sizes = {}
    for impl in ("naive", "absorb"):
        model.attn_impl = impl
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(ids, cache=cache)
        sizes[impl] = cache.nbytes() / (2 * 10 * c.num_hidden_layers * 4)  # fp32 values
    assert sizes["absorb"] == c.kv_lora_rank + c.qk_rope_head_dim
    assert sizes["naive"] == c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)


def test_mtp_logits_follow_eqs_21_to_23():
    model = _model({"num_nextn_predict_layers": 2}, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        out = model(ids, mtp=True)
        logits, mtp = out.logits, out.mtp_logits
        assert [m.shape[1] for m in mtp] == [11, 10]
        torch.testing.assert_close(logits, model(ids).logits)
        # depth 1 by hand: [enorm(Emb(t_{i+1})); hnorm(h_i)] → eh_proj → block → norm → head
        module = model.model.mtp[0]
        h0 = model.hidden_states(ids)[0][:, :11]
        emb = model.model.embed_tokens(ids[:, 1:])
        x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h0)], dim=-1))
        cos, sin = model.model.rotary_emb(torch.arange(11))
        mask = torch.full((11, 11), float("-inf")).triu(1)
        h1, _ = module(x, cos, sin, mask)
        ref = model.lm_head(module.shared_head.norm(h1))
    assert rel_err(mtp[0], ref) < 1e-6


def test_every_parameter_learns():
    model = _model({}).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    out = model(ids, mtp=True)
    loss = out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    # an expert that no token chose this step gets no gradient; everything else must
    silent = [n for n in silent if ".experts." not in n]
    assert not silent, silent


def test_bad_input_is_refused_clearly():
    model = _model({})
    v = model.config.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, v]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attn_impl"):
        model.attn_impl = "flash"
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="mtp=True"):
        model(torch.zeros(1, 1, dtype=torch.long), mtp=True, cache=model.new_cache(1, 4))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be a tensor with the shape"):
        model(ids, ids[:, 1:])
    with pytest.raises(ValueError, match="labels must be a tensor"):
        model(ids, model.new_cache(1, 4))  # the cache is a keyword argument
    for bad in (float("nan"), -0.1, "0.3"):
        with pytest.raises(ValueError, match="mtp_lambda"):
            model(ids, ids, mtp_lambda=bad)
        with pytest.raises(ValueError, match="alpha"):
            model(ids, ids, alpha=bad)
    model.attn_impl = "absorb"
    with pytest.raises(ValueError, match="made for 'naive'"):
        cache = model.new_cache(1, 4).__class__(1, 4, "naive")
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def _balance_by_hand(scores, indices, batch, alpha):
    """Eqs. (17)–(20) one sequence at a time, with loops over experts: f_i, P_i, Σ f_i P_i."""
    n_experts, k = scores.shape[1], indices.shape[1]
    per_sequence = []
    for seq_scores, seq_indices in zip(
        scores.view(batch, -1, n_experts), indices.view(batch, -1, k)
    ):
        t = seq_scores.shape[0]
        total = 0.0
        for i in range(n_experts):
            f = n_experts / (k * t) * (seq_indices == i).any(dim=1).sum()  # eq. (18)
            p = (seq_scores[:, i] / seq_scores.sum(dim=1)).mean()  # eqs. (19)-(20)
            total = total + f * p
        per_sequence.append(alpha * total)  # eq. (17)
    return torch.stack(per_sequence).mean()


@pytest.mark.parametrize("mtp_lambda, alpha", [(0.3, 1e-2), (0.1, None), (0.0, 0.5)])
def test_losses_equal_a_hand_computation(mtp_lambda, alpha):
    """Cross-entropy, the MTP objective (eqs. 24–25, D = 2) and the sequence-wise balance
    loss (eqs. 17–20) of the output, against the same formulas written out here."""
    model = _model({"num_nextn_predict_layers": 2}, seed=int(1e3 * mtp_lambda) + 7)
    gen = torch.Generator().manual_seed(int(1e3 * mtp_lambda))
    ids = torch.randint(0, model.config.vocab_size, (3, 14), generator=gen)
    labels = torch.randint(0, model.config.vocab_size, (3, 14), generator=gen)
    out = model(ids, labels, mtp=True, mtp_lambda=mtp_lambda, alpha=alpha)
    v = model.config.vocab_size
    main = -out.logits.log_softmax(-1).gather(-1, labels[..., None]).mean()
    assert rel_err(out.main_loss, main) < 1e-6
    assert [m.shape for m in out.mtp_logits] == [(3, 13, v), (3, 12, v)]
    depths = []
    for k, logits in enumerate(out.mtp_logits, start=1):  # depth k predicts labels[:, k:]
        depths.append(-logits.log_softmax(-1).gather(-1, labels[:, k:, None]).mean())
        assert rel_err(out.mtp_losses[k - 1], depths[-1]) < 1e-6
    total = main + mtp_lambda / 2 * (depths[0] + depths[1])
    n_moe = len(model.moe_layers())
    assert len(out.routing) == n_moe  # main layers and both MTP modules
    if alpha is None:
        assert out.balance_loss is None
    else:
        balance = sum(_balance_by_hand(r.scores, r.indices, 3, alpha) for r in out.routing)
        assert rel_err(out.balance_loss, balance) < 1e-6
        total = total + balance
    assert rel_err(out.loss, total) < 1e-6
    out.loss.backward()  # the balance loss reaches the gate through the scores
    assert all(m.gate.weight.grad is not None for m in model.moe_layers())


def test_routing_is_this_calls_and_in_moe_layers_order():
    model = _model({})
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = model(ids)
    assert out.loss is None and out.mtp_logits == [] and out.mtp_losses == []
    main = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
    assert len(out.routing) == len(main)  # inference: the main model only, one pass
    with torch.no_grad():
        u = model.model.embed_tokens(ids)
        cos, sin = model.model.rotary_emb(torch.arange(9))
        mask = torch.full((9, 9), float("-inf")).triu(1)
        got = []
        for layer in model.model.layers:
            u, r = layer(u, cos, sin, mask)
            if r is not None:
                got.append(r)
    for a, b in zip(out.routing, got):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.load, b.load)
        assert a.load.sum() == 2 * 9 * model.config.num_experts_per_tok
    with_mtp = model(ids, ids, mtp_lambda=0.3)  # labels with λ > 0: the MTP modules run
    assert len(with_mtp.routing) == len(model.moe_layers()) and with_mtp.mtp_losses
    assert model(ids, ids).mtp_logits == []  # λ = 0 by default: one pass
