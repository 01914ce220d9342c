"""Greedy decoding with the KV cache equals greedy decoding by recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch

from dsv3lite import DeepSeekV3, preset
from dsv3lite.generate import greedy


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(preset("tiny")).eval()


def _greedy_without_cache(model: DeepSeekV3, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The definition: run the full sequence again for every new token, take the argmax."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_cached_greedy_equals_recompute(model: DeepSeekV3, impl: str) -> None:
    prompt = torch.randint(
        0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1)
    )
    model.attn_impl = impl
    expected = _greedy_without_cache(model, prompt, 9)
    model.attn_impl = "naive" if impl == "absorb" else "absorb"
    out = greedy(model, prompt, 9, attn_impl=impl)
    assert out.dtype == torch.long and out.shape == (3, 16)
    assert torch.equal(out, expected)
    assert model.attn_impl != impl, "greedy must restore the model's own attn_impl"


def test_both_paths_decode_the_same_tokens(model: DeepSeekV3) -> None:
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(greedy(model, prompt, 6, attn_impl="naive"), greedy(model, prompt, 6))


def test_zero_new_tokens_returns_the_prompt(model: DeepSeekV3) -> None:
    prompt = torch.randint(0, model.config.vocab_size, (2, 4), dtype=torch.int32)
    out = greedy(model, prompt, 0)
    assert out.dtype == torch.long and torch.equal(out, prompt.long())


@pytest.mark.parametrize(
    "ids, n, impl, match",
    [
        (torch.zeros(4, dtype=torch.long), 2, "absorb", "shape"),
        (torch.zeros(1, 4), 2, "absorb", "integer token ids"),
        (torch.zeros(1, 0, dtype=torch.long), 2, "absorb", "one prompt token"),
        (torch.zeros(1, 4, dtype=torch.long), -1, "absorb", "max_new_tokens"),
        (torch.zeros(1, 4, dtype=torch.long), 2.0, "absorb", "max_new_tokens"),
        (torch.zeros(1, 4, dtype=torch.long), True, "absorb", "max_new_tokens"),
        (torch.zeros(1, 4, dtype=torch.long), 2, "flash", "attn_impl"),
        (torch.zeros(1, 500, dtype=torch.long), 13, "absorb", "max_position_embeddings"),
        (torch.full((1, 4), 10**6, dtype=torch.long), 2, "absorb", "vocabulary"),
    ],
)
def test_bad_arguments_raise(model: DeepSeekV3, ids, n, impl, match) -> None:
    before = model.attn_impl
    with pytest.raises(ValueError, match=match):
        greedy(model, ids, n, attn_impl=impl)
    assert model.attn_impl == before


def test_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="DeepSeekV3"):
        greedy(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), 1)
