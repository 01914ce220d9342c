"""Reference solutions of the exercises added to notebooks 02 and 03 — look only after trying.

Each passes its check: ``check_max_violation`` (``dsv3lite.exercises.moe``) and
``check_mtp_loss`` (``dsv3lite.exercises.mtp``). The notebooks never import this module; the
tests and the solutions notebook do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ 02 MoE
def max_violation(load: torch.Tensor) -> float:
    """MaxVio of per-expert token counts: the busiest expert over the mean, minus one."""
    load = load.float()
    return float(load.max() / load.mean() - 1)


# ------------------------------------------------------------------------------ 03 MTP
def mtp_loss(mtp_logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """L^k_MTP (eq. 24): depth k at position i predicts t_{i+k+1} = labels[:, i+k]."""
    return F.cross_entropy(mtp_logits.flatten(0, 1), labels[:, k:].flatten())
