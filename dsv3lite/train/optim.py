"""The optimizer every training path uses (trainer, pipeline stages, benchmarks, tests)."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (β 0.9/0.95, as the report trains) over ``module``'s parameters (the model, or
    a pipeline stage); weight decay ``cfg.weight_decay`` on matrices only, never on norms,
    biases or other vectors, whose scale decay would only pull towards zero.

    On a GPU the fused implementation: one kernel updates a whole chunk of parameters, where
    the default (``foreach``) launches a dozen multi-tensor kernels per group and step — at a
    small model's step that is launch time, not arithmetic."""
    decay = [p for p in module.parameters() if p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in module.parameters()) or None  # None: torch's default
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)
