"""What the ``mla`` and ``moe`` suites share: a kernel row judged against the device's ceilings.

Each row reports the bytes it reads per second (GB/s, its ``value``) and its TFLOP/s, each
also as a fraction of the ceiling measured in the same run (``harness.measure_ceilings``):
a memory-bound kernel is judged by the copy, a compute-bound one by the bf16 GEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .harness import Row, check, median_ms


@dataclass(frozen=True)
class Work:
    """What one call reads (the figure its GB/s is of) and computes."""

    bytes_read: int
    flops: int


def timed(
    shape: str,
    impl: str,
    fn: Callable[[], torch.Tensor],
    view: Callable[[torch.Tensor], torch.Tensor],
    ref: torch.Tensor,
    work: Work,
    ceilings: dict[str, float | None],
    quick: bool,
    note: str = "",
) -> Row:
    """Check ``view(fn())`` against ``ref`` (relative error ≤ 2e-2), then time ``fn``."""
    err = check(f"{impl} {shape}", view(fn()), ref, 2e-2)
    ms = median_ms(fn, ref.device, quick)
    gbs, tflops = work.bytes_read / ms / 1e6, work.flops / ms / 1e9
    extra = {
        "impl": impl,
        "tflops": tflops,
        "of_copy": _fraction(gbs, ceilings.get("copy_gbs")),
        "of_gemm": _fraction(tflops, ceilings.get("gemm_tflops")),
        "rel_err": err,
    }
    return Row(f"{impl} {shape}", shape, ms, gbs, "GB/s", note, extra)


def skipped(shape: str, impl: str, why: str) -> Row:
    extra = dict.fromkeys(("tflops", "of_copy", "of_gemm", "rel_err"))
    return Row(f"{impl} {shape}", shape, None, None, "GB/s", why, {"impl": impl, **extra})


def kernels_runnable(device: torch.device) -> bool:
    """The Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from ..kernels._triton import INTERPRETED

    return device.type == "cuda" or INTERPRETED


def _fraction(value: float, ceiling: float | None) -> float | None:
    return value / ceiling if ceiling else None
