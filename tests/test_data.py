"""Corpus, tokenizer and batches."""

import pytest
import torch

from dsv3lite.train.data import TokenData, load_tokenizer, read_corpus, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return read_corpus()


def test_default_corpus_is_embedded_and_deterministic(corpus):
    assert len(corpus) > 400_000
    assert read_corpus() == corpus


def test_tokenizer_round_trips_any_text(corpus, tmp_path):
    tok = train_tokenizer(corpus, 512)
    assert tok.get_vocab_size() == 512
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓ 🚀"
    assert tok.decode(tok.encode(text).ids) == text
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path, 512).encode(text).ids == tok.encode(text).ids
    with pytest.raises(ValueError, match="does not belong"):
        load_tokenizer(tmp_path, 256)


def test_split_and_packed_batches(corpus):
    tok = train_tokenizer(corpus, 512)
    data = TokenData.from_text(corpus, tok)
    again = TokenData.from_text(corpus, tok)
    assert torch.equal(data.val, again.val)
    assert len(data.val) == int((len(data.train) + len(data.val)) * 0.05)
    x, y = data.batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert 0 < data.unigram_entropy() < torch.log(torch.tensor(512.0))


def test_bad_corpora_are_refused(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("too short")
    with pytest.raises(ValueError, match="characters"):
        read_corpus(small)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_corpus(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("word " * 3000)
    assert len(read_corpus(tmp_path / "folder")) == 15000
