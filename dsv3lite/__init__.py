"""dsv3lite: a working, readable reproduction of DeepSeek-V3's infrastructure.

Public API::

    from dsv3lite import ModelConfig, DeepSeekV3, load_pretrained, save_pretrained
    model = DeepSeekV3(preset("tiny"))
    logits = model(input_ids)                                  # [B, T, vocab_size]
"""

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig, preset
from .generate import greedy, sample
from .model import DeepSeekV3, KVCache
from .speculative import speculative_generate

__all__ = [
    "ModelConfig",
    "preset",
    "DeepSeekV3",
    "KVCache",
    "load_pretrained",
    "save_pretrained",
    "greedy",
    "sample",
    "speculative_generate",
]
__version__ = "0.1.0"
