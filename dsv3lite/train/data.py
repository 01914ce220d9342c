"""Text, tokenizer and batches: everything between a folder of text and (inputs, targets).

The default corpus is the English prose that ships inside CPython itself
(``pydoc_data.topics``: the language reference behind ``help("assert")`` and friends, about
0.47 MB), so a course runs on any machine with Python and no download. ``--data PATH`` takes a
text file or a folder of them instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import UserInputError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", "")
MIN_CHARS = 10_000  # below this a train/validation split says nothing


def default_corpus() -> str:
    """CPython's documentation topics, in a fixed order (sorted by topic name)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_corpus(path: str | os.PathLike | None = None) -> str:
    """The default corpus, or the text of a file / of every text file under a folder (sorted)."""
    if path is None:
        text = default_corpus()
    else:
        p = Path(path)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
            )
        else:
            raise FileNotFoundError(f"--data {p}: no such file or folder")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if len(text) < MIN_CHARS:
        raise ValueError(
            f"corpus {path or 'default'} has {len(text)} characters; at least {MIN_CHARS} are "
            "needed to train a tokenizer and hold out a validation split"
        )
    return text


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (as DeepSeek-V3 uses, §4.1), trained on ``text``.

    Byte-level means any string encodes without unknown tokens: the 256 bytes are the base
    alphabet and merges grow from there up to ``vocab_size``.
    """
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>"],  # ids 0 and 1, as config.bos/eos_token_id
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    return tok


def _chunks(text: str, size: int = 1 << 16):
    for i in range(0, len(text), size):
        yield text[i : i + size]


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """Read tokenizer.json; with ``vocab_size``, check it fits the model."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
        raise UserInputError(f"{file} is not a readable tokenizer.json: {err}") from None
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise UserInputError(
            f"tokenizer {file} has {tok.get_vocab_size()} tokens but the model's vocab_size is "
            f"{vocab_size}: this tokenizer does not belong to this checkpoint"
        )
    return tok


@dataclass
class TokenData:
    """The corpus as one stream of token ids, split once into train and validation."""

    train: torch.Tensor  # int64 [n_train]
    val: torch.Tensor  # int64 [n_val]

    @classmethod
    def from_text(cls, text: str, tok: Tokenizer, val_fraction: float = 0.05) -> TokenData:
        """Encode, then hold out the *last* val_fraction: deterministic, and no document's
        tokens land on both sides except at the one cut."""
        ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
        n_val = max(int(len(ids) * val_fraction), 1)
        return cls(train=ids[:-n_val], val=ids[-n_val:])

    def batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed sequences: seq_len+1 consecutive tokens from random offsets; inputs and the
        next-token targets."""
        data = self.train if split == "train" else self.val
        if len(data) <= seq_len + 1:
            raise ValueError(
                f"the {split} split has {len(data)} tokens, fewer than seq_len+1={seq_len + 1}; "
                "use a larger corpus or a shorter seq_len"
            )
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the train split's token frequencies: the loss of a model that
        ignores context, so a trained model must land clearly below it."""
        counts = torch.bincount(self.train).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())
