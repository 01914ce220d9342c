"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr."""

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
