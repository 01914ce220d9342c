"""A small trained model shipped with the package, so that samples and speculation in the
notebooks read as language instead of the loops of a model trained for a minute.

``tiny-docs/`` holds the ``tiny`` preset (2.6M parameters with its MTP module) trained on the
embedded corpus (CPython's documentation), in bf16, as ``train`` writes it (config.json, the
release's safetensors layout, tokenizer.json): the checkpoint of step 750 of

    python -m dsv3lite train --preset tiny --steps 2500 --ckpt-every 250 --out runs/tiny-docs
    python -m dsv3lite.pretrained runs/tiny-docs/last    # once step 750's checkpoint is written

Why step 750 of a longer run: the corpus is small, and the validation loss is lowest around
steps 500–600 (still at the high learning rate of the cosine schedule's first third); later
steps memorise the training text. ``metrics.json`` beside it records the run's last
evaluation before the checkpoint (step 700: the run evaluates every 100 steps).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..checkpoint import load_pretrained
from ..model import DeepSeekV3
from ..train.data import load_tokenizer

NAME = "tiny-docs"


def path() -> Path:
    """The shipped checkpoint's folder inside the installed package."""
    return Path(str(files(__name__) / NAME))


def load_tiny(attn_impl: str = "naive") -> tuple[DeepSeekV3, Tokenizer]:
    """The shipped trained ``tiny`` model (fp32, eval mode) and its tokenizer."""
    model = load_pretrained(path(), dtype=torch.float32).eval()
    model.attn_impl = attn_impl
    return model, load_tokenizer(path(), model.config.vocab_size)
