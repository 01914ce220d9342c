"""The model, one concept per file: norm, rope, mla, moe, experts, mtp, block, transformer,
cache, losses, output."""

from .cache import KVCache
from .experts import Experts, set_moe_impl
from .losses import sequence_balance_loss
from .mla import MLA
from .moe import MLP, Gate, MoE, Routing
from .mtp import MTPModule
from .output import ModelOutput
from .transformer import DeepSeekV3

__all__ = [
    "KVCache",
    "MLA",
    "MLP",
    "Gate",
    "MoE",
    "Experts",
    "set_moe_impl",
    "Routing",
    "MTPModule",
    "DeepSeekV3",
    "ModelOutput",
    "sequence_balance_loss",
]
