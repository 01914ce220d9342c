"""Cached decoding: greedy equals recomputing the sequence, sampling follows its rule; the CLI."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from dsv3lite import DeepSeekV3, preset, save_pretrained
from dsv3lite.__main__ import main
from dsv3lite.generate import greedy, probabilities, sample, sampling_rule, top_p_mask
from dsv3lite.train.data import default_corpus, train_tokenizer


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(preset("tiny")).eval()


def _greedy_without_cache(model: DeepSeekV3, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The definition: run the full sequence again for every new token, take the argmax."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
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


def _nucleus_reference(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition, one row at a time: add the most likely tokens until their mass >= top_p."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for row, p in enumerate(probs.tolist()):
        mass = 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i]):
            keep[row, i] = True
            mass += p[i]
            if mass >= top_p:
                break
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 50, generator=gen, dtype=torch.float64) * 2
    probs = torch.softmax(logits, dim=-1)
    keep = top_p_mask(probs, top_p)
    assert torch.equal(keep, _nucleus_reference(probs, top_p))
    assert keep.sum(-1).min() >= 1
    cut = probabilities(logits, 1.0, top_p)
    assert torch.all(cut[~keep] == 0)
    assert torch.allclose(cut.sum(-1), torch.ones(16, dtype=torch.float32))
    expected = probs * keep / (probs * keep).sum(-1, keepdim=True)
    assert torch.allclose(cut, expected.float(), atol=1e-6)


def test_the_sampling_rule_draws_from_the_cut_distribution() -> None:
    logits = torch.tensor([1.0, 0.8, 0.5, 0.0, -1.0, -3.0])
    rule = sampling_rule(0.9, 0.7, torch.Generator().manual_seed(4))
    draws = rule(logits.expand(40_000, -1))
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    expected = probabilities(logits, 0.9, 0.7).double()
    assert expected[3:].sum() == 0 and expected[:3].min() > 0.05
    assert (freq - expected).abs().max() < 0.01  # 4 standard errors at 40,000 draws


def test_temperature_zero_is_greedy(model: DeepSeekV3) -> None:
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(sample(model, prompt, 6, temperature=0.0), greedy(model, prompt, 6))
    logits = torch.tensor([[0.3, 0.1, 0.25], [1.0, 2.0, 1.9]])
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 3).float()
    assert torch.allclose(probabilities(logits, 1e-3), one_hot)  # the limit T -> 0


def test_seeded_sampling_is_reproducible(model: DeepSeekV3) -> None:
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(6)
    )

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return sample(model, prompt, 8, temperature=1.5, top_p=0.9, generator=gen)

    first = run(0)
    assert first.shape == (2, 13) and torch.equal(first[:, :5], prompt)
    assert torch.equal(run(0), first)
    assert not torch.equal(run(1), first)


@pytest.mark.parametrize(
    "temperature, top_p, match",
    [
        (-0.1, 1.0, "temperature"),
        (float("nan"), 1.0, "temperature"),
        (float("inf"), 1.0, "temperature"),
        ("1", 1.0, "temperature"),
        (1.0, 0.0, "top_p"),
        (1.0, 1.5, "top_p"),
        (1.0, float("nan"), "top_p"),
    ],
)
def test_bad_sampling_arguments_raise(model: DeepSeekV3, temperature, top_p, match) -> None:
    with pytest.raises(ValueError, match=match):
        sample(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=temperature, top_p=top_p)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model: DeepSeekV3) -> Path:
    """A random tiny model with a small byte-level BPE beside it, as the trainer writes them."""
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, path)
    train_tokenizer(default_corpus()[:50_000], 300).save(str(path / "tokenizer.json"))
    return path


def _generate(capsys, *args: str) -> str:
    assert main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_cli_generates_and_reports_speculation(checkpoint: Path, capsys) -> None:
    prompt = "The for statement"
    out = _generate(capsys, str(checkpoint), prompt, "--max-new-tokens", "9", "--seed", "3")
    assert out.startswith(prompt) and len(out) > len(prompt) + 1
    assert _generate(capsys, str(checkpoint), prompt, "--max-new-tokens", "9", "--seed", "3") == out
    flags = ["--max-new-tokens", "12", "--temperature", "0", "--mtp-speculative"]
    out = _generate(capsys, str(checkpoint), prompt, *flags)
    assert out.startswith(prompt)
    assert re.search(r"\d+/\d+ drafts accepted \([\d.]+%\), [\d.]+ tokens per main-model", out)
    assert re.search(r"tokens/s speculative vs [\d.]+ tokens/s plain decoding", out)
    assert "the same tokens as plain greedy decoding: yes" in out


def test_cli_errors_are_clear(checkpoint: Path, tmp_path: Path, capsys) -> None:
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    small = tmp_path / "small_vocab"
    save_pretrained(DeepSeekV3(preset("tiny", vocab_size=280)), small)
    shutil.copy(checkpoint / "tokenizer.json", small)
    no_mtp = tmp_path / "no_mtp"
    save_pretrained(DeepSeekV3(preset("tiny", num_nextn_predict_layers=0)), no_mtp)
    shutil.copy(checkpoint / "tokenizer.json", no_mtp)
    cases = [
        ([str(tmp_path / "nowhere"), "hi"], "no checkpoint"),
        ([str(no_tokenizer), "hi"], "no tokenizer.json"),
        ([str(small), "hi"], "does not belong to this checkpoint"),
        ([str(checkpoint), "  "], "prompt is empty"),
        ([str(checkpoint), "hi", "--temperature", "-1"], "temperature"),
        ([str(checkpoint), "hi", "--top-p", "0"], "top_p"),
        ([str(checkpoint), "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        ([str(checkpoint), "hi", "--max-new-tokens", "600"], "max_position_embeddings"),
        ([str(no_mtp), "hi", "--mtp-speculative"], "has none"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
