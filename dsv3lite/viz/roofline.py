"""The roofline, drawn once for every picture of the course that places a kernel on it
(notebook 01's absorbed MLA step, notebook 09's decode kernel and its explorer).

The arithmetic — the two ceilings, the ridge, what a kernel of a given intensity can attain —
is ``dsv3lite.accounting.Roofline``; this module only draws it, so that the line a learner
reads in one notebook is the same line, from the same numbers, as in the other.
"""

from __future__ import annotations

import math

import torch

from ..accounting import Roofline


def roofline(
    ax,
    roof: Roofline,
    span: tuple[float, float] = (1.0, 2000.0),
    *,
    labels: bool = True,
    ylim: tuple[float, float] | None = None,
) -> None:
    """Draw ``roof`` on ``ax``, log–log: attainable TFLOP/s = min(bandwidth × intensity, FLOP
    rate) for intensities across ``span`` (FLOP/byte), and the ridge (dashed) where the two
    roofs meet — a kernel left of it is bound by bytes, right of it by FLOPs.

    ``labels`` writes each roof's rate beside it (the measured copy bandwidth on the slope,
    the bf16 GEMM rate on the flat part); ``ylim`` fixes the TFLOP/s axis, otherwise it fits
    the line."""
    lo, hi = span
    ai = torch.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(ai, torch.clamp(ai * roof.bytes_per_s, max=roof.flops) / 1e12, "k-", lw=1.2)
    ax.axvline(roof.ridge, color="gray", ls="--", lw=1)
    if labels:
        gbs, tflops = roof.bytes_per_s / 1e9, roof.flops / 1e12
        x = 1.2 * lo  # above the slope, near its foot
        ax.text(x, 2 * x * gbs / 1e3, f"copy {gbs:,.0f} GB/s", rotation=30, fontsize=9)
        ax.text(20 * lo, tflops * 1.15, f"bf16 GEMM {tflops:.0f} TFLOP/s", fontsize=9)
    ax.set(xscale="log", yscale="log", xlim=span, xlabel="arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable TFLOP/s")
    if ylim is not None:
        ax.set_ylim(ylim)
