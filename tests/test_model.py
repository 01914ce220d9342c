"""The model: naive == absorbed MLA, cached decode == full forward, MTP by its equations, errors."""

import pytest
import torch

from dsv3lite import DeepSeekV3, preset

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


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_absorbed_equals_naive(name):
    model = _model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        naive = model(ids)
        model.attn_impl = "absorb"
        absorbed = model(ids)
    assert _rel(absorbed, naive) < 1e-5


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decode_equals_full_forward(name, impl):
    model = _model(CONFIGS[name], seed=1)
    model.attn_impl = impl
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 24)
        steps = [model(ids[:, :9], cache)]  # a prefill chunk, a second chunk, then tokens
        steps.append(model(ids[:, 9:14], cache))
        steps += [model(ids[:, t : t + 1], cache) for t in range(14, 20)]
    assert cache.seq_len == 20
    assert _rel(torch.cat(steps, dim=1), full) < 1e-5


def test_latent_cache_holds_kv_lora_rank_plus_rope_values_per_token():
    model = _model({})
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 10))
    sizes = {}
    for impl in ("naive", "absorb"):
        model.attn_impl = impl
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(ids, cache)
        sizes[impl] = cache.nbytes() / (2 * 10 * c.num_hidden_layers * 4)  # fp32 values
    assert sizes["absorb"] == c.kv_lora_rank + c.qk_rope_head_dim
    assert sizes["naive"] == c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)


def test_mtp_logits_follow_eqs_21_to_23():
    model = _model({"num_nextn_predict_layers": 2}, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits, mtp = model.forward_with_mtp(ids)
        assert [m.shape[1] for m in mtp] == [11, 10]
        torch.testing.assert_close(logits, model(ids))
        # depth 1 by hand: [enorm(Emb(t_{i+1})); hnorm(h_i)] → eh_proj → block → norm → head
        module = model.model.mtp[0]
        h0 = model.hidden_states(ids)[:, :11]
        emb = model.model.embed_tokens(ids[:, 1:])
        x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h0)], dim=-1))
        cos, sin = model.model.rotary_emb(torch.arange(11))
        mask = torch.full((11, 11), float("-inf")).triu(1)
        h1 = module(x, cos, sin, mask)
        ref = model.lm_head(module.shared_head.norm(h1))
    assert _rel(mtp[0], ref) < 1e-6


def test_every_parameter_learns():
    model = _model({}).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    logits, mtp = model.forward_with_mtp(ids)
    loss = logits.logsumexp(-1).mean() + mtp[0].logsumexp(-1).mean()
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
    model(torch.zeros(1, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)
    model.attn_impl = "absorb"
    with pytest.raises(ValueError, match="made for 'naive'"):
        model(torch.zeros(1, 1, dtype=torch.long), model.new_cache(1, 4).__class__(1, 4, "naive"))
