"""What one forward pass of ``DeepSeekV3`` returns: logits, the routing it decided, the losses.

The model computes its own training objective (report §2.1.2 and §2.2), so that the trainer,
the pipeline and the notebooks share one definition of it:

    L = L_Main + λ · (1/D) Σ_{k=1..D} L^k_MTP  [+ Σ_layers L_Bal]           (25), (17)

``routing`` is what the auxiliary-loss-free bias update needs (each layer's ``load``) and what
the sequence-wise balance loss is computed from (``scores``, ``indices``): returned rather than
kept on the modules, so it is always this call's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .moe import Routing


@dataclass
class ModelOutput:
    """The result of ``model(input_ids, labels=None, ...)``.

    logits: [B, T, vocab_size], the main model's next-token logits.
    mtp_logits: per MTP depth k = 1 … D, [B, T−k, vocab_size] for tokens i+k+1 (eq. 23); empty
        unless MTP ran (labels with mtp_lambda > 0, or ``mtp=True``).
    routing: the ``Routing`` of every MoE layer that ran, in ``model.moe_layers()`` order (main
        layers, then the MTP modules').
    loss: the total (eq. 25, plus the balance loss when ``alpha`` is given); None without labels.
    main_loss: next-token cross-entropy, mean over the B·T positions.
    mtp_losses: per depth, L^k_MTP (eq. 24) as a mean over its T−k positions.
    balance_loss: the sequence-wise balance loss summed over the MoE layers (eqs. 17–20, × α).
    """

    logits: torch.Tensor
    routing: list[Routing] = field(default_factory=list)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    balance_loss: torch.Tensor | None = None
