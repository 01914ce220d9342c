"""Helpers for the FP8 numerics study (report §3.3.1–§3.3.2), small and CPU-only.

Three questions, one group of functions each:

1. What do the two FP8 formats hold? ``format_properties`` / ``fp8_formats`` read them off
   ``torch.finfo``: E4M3 has more precision (3 mantissa bits), E5M2 more range (5 exponent
   bits). The report uses E4M3 for every tensor, Fprop and backward alike (§3.3.1), and buys
   back the range with fine-grained scales.
2. How much do the scales' granularity matter? ``fake_quant`` quantizes and dequantizes with one
   scale per tensor, per row, per 1×128 tile or per 128×128 block; ``quant_error`` measures the
   relative Frobenius error; ``outlier_activations`` makes the kind of tensor where it matters:
   a few channels far larger than the rest, and tokens of very different magnitudes.
3. Why promote the accumulator? ``limited_dot`` emulates a tensor core whose running sum keeps
   about 14 bits; ``accumulation_error`` reproduces the report's "maximum relative error of
   nearly 2%" at K = 4096 and shows that promotion to FP32 every N_C = 128 products fixes it.
"""

from __future__ import annotations

import math

import torch

from ..kernels.fp8_quant import expand_scales, group_quant_ref

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRANULARITIES: dict[str, tuple[int | None, int | None]] = {
    "tensor": (None, None),  # one scale for everything (the usual FP8 recipe)
    "row": (1, None),  # one per token
    "1x128": (1, 128),  # the report's activation tiles
    "128x128": (128, 128),  # the report's weight blocks
}


# ----------------------------------------------------------------------------- 1. the formats
def format_properties(dtype: torch.dtype) -> dict[str, float]:
    """Bits and range of a floating format, from ``torch.finfo``.

    ``relative_spacing`` is the gap between 1 and the next value (2^-mantissa_bits): rounding
    to nearest errs by at most half of it, relative, anywhere in the normal range. Below
    ``min_normal`` the spacing stays fixed at ``min_subnormal`` and the relative error grows.
    """
    fi = torch.finfo(dtype)
    mantissa = round(-math.log2(fi.eps))
    return {
        "bits": fi.bits,
        "exponent_bits": fi.bits - 1 - mantissa,
        "mantissa_bits": mantissa,
        "max": fi.max,
        "min_normal": fi.smallest_normal,
        "min_subnormal": fi.smallest_normal * fi.eps,
        "relative_spacing": fi.eps,
        "binades": math.log2(fi.max / (fi.smallest_normal * fi.eps)),
    }


def fp8_formats() -> dict[str, dict[str, float]]:
    """``format_properties`` of E4M3 and E5M2, keyed by their names."""
    return {"e4m3": format_properties(E4M3), "e5m2": format_properties(E5M2)}


# ----------------------------------------------------------------------------- 2. granularity
def fake_quant(
    x: torch.Tensor,
    granularity: str | tuple[int | None, int | None] = "1x128",
    dtype: torch.dtype = E4M3,
) -> torch.Tensor:
    """Quantize a 2-D ``x`` to FP8 and back (float32), one scale per group.

    ``granularity`` is a key of ``GRANULARITIES`` or a (rows, cols) group shape, None meaning
    "the whole dimension". It runs the package's one quantizer (``dsv3lite.fp8.quant``'s rules,
    its torch reference) with the group shape and format asked for, so ``"1x128"`` and
    ``"128x128"`` give exactly ``act_quant`` / ``weight_quant``.
    """
    rows, cols = GRANULARITIES[granularity] if isinstance(granularity, str) else granularity
    m, k = x.shape
    rows, cols = rows or m, cols or k
    q, s = group_quant_ref(x, rows, cols, dtype=dtype)
    return q.float() * expand_scales(s, (m, k), (rows, cols))


def quant_error(
    x: torch.Tensor,
    granularity: str | tuple[int | None, int | None] = "1x128",
    dtype: torch.dtype = E4M3,
    where: torch.Tensor | None = None,
) -> float:
    """Relative Frobenius error ‖fake_quant(x) − x‖ / ‖x‖.

    ``where`` (a boolean mask or an index for the columns, e.g. the ordinary channels) restricts
    the *measurement*, not the quantization: a few huge outliers would otherwise dominate both
    norms and hide what happened to everything else.
    """
    err = fake_quant(x, granularity, dtype) - x.float()
    ref = x.float()
    if where is not None:
        err, ref = err[..., where], ref[..., where]
    return (err.norm() / ref.norm()).item()


def outlier_activations(
    tokens: int = 1024,
    channels: int = 1024,
    n_outliers: int = 8,
    outlier_scale: float = 1e4,
    token_sigma: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic activations [tokens, channels] and the indices of their outlier channels.

    Standard normal values; each token scaled by exp(N(0, token_sigma²)) (tokens differ in
    magnitude, gradients even more); ``n_outliers`` random channels multiplied by
    ``outlier_scale``, the pattern LLM activations are known for. With the defaults, one scale
    per tensor pushes the ordinary channels into E4M3's subnormals (about 20% error there),
    while per-row or 1×128 scales keep them at E4M3's usual ~2.7%.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    x = x * torch.exp(token_sigma * torch.randn(tokens, 1, generator=g))
    outliers = torch.randperm(channels, generator=g)[:n_outliers]
    x[:, outliers] *= outlier_scale
    return x, outliers


# ----------------------------------------------------------------------------- 3. accumulation
def truncate_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` leading significant bits of each float64 value, rounding toward zero.

    frexp writes x = m · 2^e with 0.5 ≤ |m| < 1; m · 2^bits truncated to an integer holds the
    leading ``bits`` bits. Zero stays zero.
    """
    m, e = torch.frexp(x)
    return torch.trunc(m * 2.0**bits) * torch.exp2((e - bits).double())


def limited_dot(
    a: torch.Tensor,
    b: torch.Tensor,
    bits: int = 14,
    group: int = 4,
    n_c: int | None = None,
) -> torch.Tensor:
    """Row-wise dot products a[i]·b[i] (a, b [T, K], FP8 values) as a tensor core sums them.

    The model of §3.3.2's "accumulation precision ... limited to retaining around 14 bits":
    products of two E4M3 values are exact (at most 8 significant bits); they enter the running
    sum ``group`` at a time, and after each addition the sum keeps only ``bits`` significant
    bits, truncated (an 8-bit exponent and a 13-bit fraction: 14 bits with the implicit one).
    The two knobs are a model, not a measurement: with bits=14 and group=4, positive inputs
    give the report's ~2% at K = 4096 (``accumulation_error``).

    ``n_c``: promotion (Figure 7b). Every ``n_c`` products the limited partial sum is added into
    a float32 accumulator — "FP32 registers on CUDA cores" — and restarts from zero.
    """
    p = a.double() * b.double()
    t, k = p.shape
    acc = torch.zeros(t, dtype=torch.float64)
    promoted = torch.zeros(t, dtype=torch.float32)
    for start in range(0, k, group):
        acc = truncate_bits(acc + p[:, start : start + group].sum(dim=1), bits)
        if n_c is not None and (start + group) % n_c == 0:
            promoted = promoted + acc.float()  # float32 addition, rounded to nearest
            acc = torch.zeros_like(acc)
    return promoted.double() + acc


def accumulation_error(
    k: int = 4096,
    trials: int = 1000,
    bits: int = 14,
    group: int = 4,
    n_c: int | None = None,
    seed: int = 0,
) -> float:
    """Maximum relative error of ``limited_dot`` over ``trials`` dot products of length ``k``.

    Inputs are E4M3-quantized uniform [0, 1) values: all positive, so the sum grows steadily
    and every product is added to an ever larger total — the case where a short accumulator
    loses most (the report: "more pronounced when the inner dimension K is large"), and one
    where relative error is well defined (no cancellation to zero). Reference: the exact sum.
    Without promotion the error grows about linearly with k; with ``n_c`` it stays at the
    error of one n_c-long partial sum.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(trials, k, generator=g).to(E4M3).double()
    b = torch.rand(trials, k, generator=g).to(E4M3).double()
    exact = (a * b).sum(dim=1)
    approx = limited_dot(a, b, bits, group, n_c)
    return ((approx - exact).abs() / exact.abs()).max().item()
