"""dsv3lite: a working, readable reproduction of DeepSeek-V3's infrastructure.

Public API::

    from dsv3lite import ModelConfig, DeepSeekV3, load_pretrained, save_pretrained
    model = DeepSeekV3(preset("tiny"))
    out = model(input_ids)                    # ModelOutput: .logits [B, T, vocab_size], .routing
    out = model(input_ids, labels, mtp_lambda=0.3)   # + .loss, .main_loss, .mtp_losses
"""

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig, preset
from .generate import greedy, sample
from .model import DeepSeekV3, KVCache, ModelOutput
from .speculative import speculative_generate

__all__ = [
    "ModelConfig",
    "preset",
    "DeepSeekV3",
    "KVCache",
    "ModelOutput",
    "load_pretrained",
    "save_pretrained",
    "greedy",
    "sample",
    "speculative_generate",
]
__version__ = "0.1.0"
