"""Checks that run the package's distributed paths against a single-process reference.

They live here, not in the library modules they check, and not in tests/ alone: the notebooks
run them too (notebook 07 runs ``testing.pipeline.run_and_check`` on CPU ranks). ``rel_err`` is
the one measure of agreement every check, test and notebook uses.
"""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in float64 (so that the measure itself does not round).

    inf when ``a`` holds a NaN or an infinity (NaN would pass no threshold either, but says less);
    ‖a − b‖ itself when ``b`` is zero, so that two zeros agree exactly."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    diff, norm = (a - b).norm().item(), b.norm().item()
    return diff / norm if norm > 0 else diff


__all__ = ["rel_err"]
