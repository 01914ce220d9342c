"""The shipped trained model: it loads from the installed package, is the ``tiny`` preset with
its MTP module, and has learned the language of its corpus (not a loop of one token)."""

from __future__ import annotations

import json

import torch

from dsv3lite.config import preset
from dsv3lite.generate import greedy
from dsv3lite.pretrained import load_tiny, path
from dsv3lite.train.data import TokenData, read_corpus


def test_it_is_the_tiny_preset_with_mtp_and_small():
    model, tok = load_tiny()
    assert model.config == preset("tiny")
    assert len(model.model.mtp) == 1
    size = sum(f.stat().st_size for f in path().iterdir())
    assert size < 8e6, f"the shipped model should stay a few MB, it is {size / 1e6:.1f} MB"
    assert tok.get_vocab_size() <= model.config.vocab_size


def test_it_predicts_text_better_than_counting_tokens():
    """Validation loss recorded at the end of its training, and recomputed here on held-out
    text of the corpus: well under the corpus's unigram entropy."""
    metrics = json.loads((path() / "metrics.json").read_text())
    model, tok = load_tiny()
    ids = TokenData.from_text(read_corpus(), tok).val[None, :257]  # the held-out end
    with torch.no_grad():
        loss = model(ids[:, :-1], labels=ids[:, 1:]).main_loss.item()
    assert loss < metrics["unigram_entropy"] - 1.0, (loss, metrics)
    assert metrics["val_loss"] < metrics["unigram_entropy"] - 1.0


def test_a_greedy_sample_is_not_a_loop():
    model, tok = load_tiny()
    prompt = torch.tensor([tok.encode("The function returns").ids])
    out = greedy(model, prompt, 40)[0, prompt.shape[1] :].tolist()
    assert len(set(out)) >= 12, tok.decode(out)
