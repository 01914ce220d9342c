"""Checks that run the package's distributed paths against a single-process reference.

They live here, not in the library modules they check, and not in tests/ alone: the notebooks
run them too (notebook 07 runs ``testing.pipeline.run_and_check`` on CPU ranks). ``rel_err`` is
the one measure of agreement every check, test and notebook uses.
"""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in float64 (so that the measure itself does not round); 0 when
    both are zero, and inf when only ``b`` is."""
    a, b = a.detach().double(), b.detach().double()
    diff, norm = (a - b).norm().item(), b.norm().item()
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / norm


__all__ = ["rel_err"]
