"""MTP self-speculative decoding: greedy gives greedy's tokens, sampling gives the main model's
distribution, and the drafts are those of the full-sequence MTP forward (eqs. 21–23)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dsv3lite import DeepSeekV3, preset
from dsv3lite.generate import greedy, probabilities
from dsv3lite.speculative import speculative_accept, speculative_generate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 decoding of tiny models is bound by dispatch, not arithmetic: a second thread adds
    nothing, and on a busy 2-core machine it made this file over 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(preset("tiny")).eval()


@pytest.fixture(scope="module")
def trained() -> DeepSeekV3:
    """A small model trained for a few steps, main + MTP loss (eqs. 24–25), on a toy language:
    every token has a fixed successor, and even tokens a second, equally likely one. Its greedy
    drafts are right more often than not, but not always."""
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny", vocab_size=64, hidden_size=64, num_hidden_layers=2))
    first, second = torch.randperm(64), torch.randperm(64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(10):
        seq = [torch.randint(0, 64, (16,))]
        for _ in range(32):
            coin = (torch.rand(16) < 0.5) & (seq[-1] % 2 == 0)
            seq.append(torch.where(coin, second[seq[-1]], first[seq[-1]]))
        x, y = torch.stack(seq[:-1], 1), torch.stack(seq[1:], 1)
        out = model(x, mtp=True)
        logits, (mtp_logits,) = out.logits, out.mtp_logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss = loss + 0.3 * F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _prompts(vocab: int, seed: int, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, 3 + 2 * i), generator=gen) for i in range(n)]


def _reference_counts(model: DeepSeekV3, out: torch.Tensor, prompt_len: int) -> tuple[int, int]:
    """(drafts, accepted) replayed from one full-sequence forward: the MTP guess for slot j is
    its argmax at position j-2, i.e. from (h_{j-2}, t_{j-1}); an accepted slot skips the next."""
    with torch.no_grad():
        (mtp_logits,) = model(out, mtp=True).mtp_logits
    guess = mtp_logits[0].argmax(-1)
    drafts = accepted = 0
    j = prompt_len + 1  # the first new token comes from the prefill, undrafted
    while j < out.shape[1]:
        drafts += 1
        hit = bool(guess[j - 2] == out[0, j])
        accepted += hit
        j += 2 if hit else 1
    return drafts, accepted


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_greedy_speculation_equals_greedy_on_a_random_model(model: DeepSeekV3, impl: str) -> None:
    model.attn_impl = "naive" if impl == "absorb" else "absorb"
    for prompt, n in zip(_prompts(model.config.vocab_size, 1), (1, 2, 7, 20), strict=True):
        out, stats = speculative_generate(model, prompt, n, attn_impl=impl)
        assert torch.equal(out, greedy(model, prompt, n, attn_impl=impl))
        assert stats.new_tokens == n and stats.main_forwards == 1 + stats.drafts
        assert len(stats.outcomes) == stats.drafts and sum(stats.outcomes) == stats.accepted
    assert model.attn_impl != impl, "speculative_generate must restore the model's attn_impl"


def test_greedy_speculation_equals_greedy_on_a_trained_model(trained: DeepSeekV3) -> None:
    drafts = accepted = 0
    for prompt in _prompts(64, 2):
        out, stats = speculative_generate(trained, prompt, 24)
        assert torch.equal(out, greedy(trained, prompt, 24))
        assert (stats.drafts, stats.accepted) == _reference_counts(trained, out, prompt.shape[1])
        assert stats.tokens_per_forward == pytest.approx(24 / stats.main_forwards)
        drafts, accepted = drafts + stats.drafts, accepted + stats.accepted
    assert 0 < accepted < drafts, "both the accept and the reject path must have run"


def test_drafts_are_the_full_sequence_mtp_guesses(model: DeepSeekV3) -> None:
    for prompt in _prompts(model.config.vocab_size, 3, n=2):
        out, stats = speculative_generate(model, prompt, 12)
        assert (stats.drafts, stats.accepted) == _reference_counts(model, out, prompt.shape[1])


def test_a_one_token_nucleus_makes_sampling_greedy(trained: DeepSeekV3) -> None:
    for prompt in _prompts(64, 4, n=2):
        gen = torch.Generator().manual_seed(0)
        out, _ = speculative_generate(
            trained, prompt, 16, temperature=0.8, top_p=1e-6, generator=gen
        )
        assert torch.equal(out, greedy(trained, prompt, 16))


def test_acceptance_test_on_crafted_distributions() -> None:
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(5)
    assert all(speculative_accept(p, q, d, gen) == (True, d) for d in (0, 1) for _ in range(50))
    zero = torch.tensor([0.6, 0.4, 0.0, 0.0])
    for _ in range(50):  # p(d) = 0: always rejected, and the resample never gives d
        accepted, token = speculative_accept(zero, q, 3, gen)
        assert not accepted and token in (0, 1)
    n = 20_000
    drafts = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    results = [speculative_accept(p, q, d, gen) for d in drafts]
    rate = sum(a for a, _ in results) / n
    assert rate == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.015)
    freq = torch.bincount(torch.tensor([t for _, t in results]), minlength=4) / n
    assert (freq - p).abs().max() < 0.015  # the output is distributed as p, not as q


def test_sampled_speculation_follows_the_main_distribution() -> None:
    """Three new tokens from a 4-token vocabulary: the 64 joint probabilities, computed from
    full forwards, against 1,500 speculative samples (the bonus token is the third)."""
    torch.manual_seed(0)
    config = preset(
        "tiny",
        vocab_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        n_routed_experts=0,
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=16,
    )
    micro = DeepSeekV3(config).eval()
    with torch.no_grad():  # sharper than the default init, so contexts matter
        for p in micro.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    prompt, temperature, top_p = torch.tensor([[1, 2, 3]]), 1.3, 0.95
    exact = torch.zeros(4, 4, 4)
    with torch.no_grad():
        for seq in itertools.product(range(4), repeat=3):
            ids = torch.cat([prompt, torch.tensor([seq])], dim=1)
            probs = probabilities(micro(ids).logits[0, 2:5], temperature, top_p)
            exact[seq] = probs[0, seq[0]] * probs[1, seq[1]] * probs[2, seq[2]]
    gen = torch.Generator().manual_seed(6)
    counts = torch.zeros(4, 4, 4)
    accepted = 0
    for _ in range(1500):
        out, stats = speculative_generate(
            micro, prompt, 3, temperature=temperature, top_p=top_p, generator=gen
        )
        counts[tuple(out[0, 3:].tolist())] += 1
        accepted += stats.accepted
    assert 0.2 < accepted / 1500 < 0.9
    total_variation = 0.5 * (counts / 1500 - exact).abs().sum().item()
    assert total_variation < 0.1  # ~0.05 expected from 1,500 draws; skipping the residual: 0.13


def test_zero_new_tokens(model: DeepSeekV3) -> None:
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), dtype=torch.int32)
    out, stats = speculative_generate(model, prompt, 0)
    assert out.dtype == torch.long and torch.equal(out, prompt.long())
    assert stats.main_forwards == 0 and stats.acceptance_rate == 0.0


def test_bad_arguments_raise(model: DeepSeekV3) -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(model, torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        speculative_generate(DeepSeekV3(preset("tiny", num_nextn_predict_layers=0)), ids, 3)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(model, ids, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(model, ids, 3, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speculative_generate(model, ids, model.config.max_position_embeddings)
