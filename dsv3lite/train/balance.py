"""Load balancing for DeepSeekMoE (report §2.1.2) and the statistic that judges it.

* Auxiliary-loss-free balancing: after each step, per MoE layer,
  b_i ← b_i + γ · sign(mean_load − load_i): overloaded experts become less attractive to the
  *selection* only (the bias never enters the gating weights, eq. 16), so no gradient fights
  the language-modelling loss.
* Complementary sequence-wise balance loss (eqs. 17–20), with a small α: part of the model's
  own loss (``dsv3lite.model.losses``), turned on by the trainer's ``--balance aux-loss``.
* MaxVio = max_i load_i / mean load − 1 (Loss-Free Balancing, arXiv 2408.15664): 0 is perfect.
"""

from __future__ import annotations

import torch

from ..model.moe import MoE

BALANCE_MODES = ("aux-free", "aux-loss", "none")


@torch.no_grad()
def update_bias(moe_layers: list[MoE], loads: list[torch.Tensor], gamma: float) -> None:
    """The aux-loss-free rule, from each layer's load over the whole step (all micro-batches)."""
    for moe, load in zip(moe_layers, loads):
        load = load.float()
        moe.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's per-expert token counts."""
    load = load.float()
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0
