"""Reference solutions of the exercises added to notebooks 08–10 (the answer key; the
notebooks never import it). The older exercises' solutions are in ``solutions.py``."""

from __future__ import annotations

import torch


def greedy_verify(main_logits: torch.Tensor, draft: int) -> list[int]:
    """Greedy verification of an MTP draft (notebook 10): row 0 of ``main_logits`` [2, V]
    predicts the draft's slot, row 1 the slot after it."""
    choice = int(main_logits[0].argmax())
    if choice == draft:
        return [draft, int(main_logits[1].argmax())]
    return [choice]
