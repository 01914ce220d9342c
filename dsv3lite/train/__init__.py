"""Training: data and tokenizer, the run's config, the trainer, the optimizer, load balancing,
schedule, plots."""

from .balance import max_violation, update_bias
from .config import TrainConfig
from .data import TokenData, load_tokenizer, read_corpus, train_tokenizer
from .optim import build_optimizer
from .trainer import RunResult, evaluate, train

__all__ = [
    "TokenData",
    "load_tokenizer",
    "read_corpus",
    "train_tokenizer",
    "max_violation",
    "update_bias",
    "RunResult",
    "TrainConfig",
    "build_optimizer",
    "evaluate",
    "train",
]
