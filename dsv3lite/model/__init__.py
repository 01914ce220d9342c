"""The model, one concept per file: norm, rope, mla, moe, mtp, block, transformer, cache."""

from .cache import KVCache
from .mla import MLA
from .moe import MLP, Gate, MoE, Routing
from .mtp import MTPModule
from .transformer import DeepSeekV3

__all__ = ["KVCache", "MLA", "MLP", "Gate", "MoE", "Routing", "MTPModule", "DeepSeekV3"]
