"""Training: data and tokenizer, the trainer, load balancing, schedule, plots."""

from .balance import max_violation, sequence_balance_loss, update_bias
from .data import TokenData, load_tokenizer, read_corpus, train_tokenizer
from .trainer import RunResult, TrainConfig, train

__all__ = [
    "TokenData",
    "load_tokenizer",
    "read_corpus",
    "train_tokenizer",
    "max_violation",
    "sequence_balance_loss",
    "update_bias",
    "RunResult",
    "TrainConfig",
    "train",
]
