"""The one FP8 quantization API of the package: Triton on a GPU, the plain-torch reference on
the CPU. Everything that quantizes calls it: FP8Linear, the checkpoint writer (the release's
``weight_scale_inv``), the expert-parallel FP8 dispatch, the grouped expert GEMM's operands,
the numerics study and the exercises' checks.

Conventions of the release's ``inference/kernel.py``: ``x ≈ q · s``, q in E4M3
(``torch.float8_e4m3fn``, ``FP8``), s float32, one scale per group of ``BLOCK`` = 128 along the
GEMM's inner dimension (report §3.3.2): 1×128 tiles for activations (``act_quant``), 128×1 for
Wgrad's (``act_quant_t``), 128×128 blocks for weights (``weight_quant``, one matrix or stacked
experts). A group's scale is ``s = amax / FP8_MAX`` (448, E4M3's largest finite value), so its
largest entry lands on 448 and nothing overflows. Both backends produce the same bytes; the GEMM
agrees to float32 rounding (the order of a 128-term sum).

The rules, the same in every kernel and reference:

* **all-zero group**: ``s = 1`` and codes 0, never a division by zero;
* **ragged edges**: a dimension that is not a multiple of 128 ends in a smaller group, scaled
  on its own (the padding is zeros and never raises an amax);
* **NaN stays NaN** (E4M3 has a NaN code, 0x7F), so a diverged step still shows in the loss;
* **±Inf saturates** to ±448, i.e. to the largest finite magnitude of its group, as the
  hardware's ``cvt.rn.satfinite`` does. Scales come from a group's *finite* values, so one bad
  element neither poisons nor flushes its neighbours. Raising instead would cost a host
  synchronisation per call;
* ``scale_fmt="ue8m0"`` rounds each scale *up* to a power of two (an 8-bit exponent, no
  mantissa, as Blackwell's block-scaled formats store it): ``|x / s| ≤ 448`` still holds, and
  dividing by a power of two is exact, so only the E4M3 rounding remains.

Which backend runs:

* ``DSV3LITE_FP8_BACKEND=torch`` or ``=triton`` forces one;
* otherwise (``auto``) Triton for CUDA tensors on GPUs with FP8 tensor cores (compute
  capability 8.9+: Ada, Hopper, Blackwell) where Triton is installed, the torch reference for
  everything else.

To run the *Triton* kernels on the CPU (tests do), set ``TRITON_INTERPRET=1`` and
``DSV3LITE_FP8_BACKEND=triton`` in the environment of a fresh process: the interpreter is
chosen when the kernels are defined, at import, so setting it later in a process that already
imported ``dsv3lite.kernels`` has no effect. The tests therefore run those cases in a
subprocess.
"""

from __future__ import annotations

import os

import torch

from ..kernels import _triton
from ..kernels import fp8_gemm as _gemm
from ..kernels import fp8_quant as _quant
from ..kernels.fp8_quant import act_dequant, weight_dequant

__all__ = [
    "act_quant",
    "act_quant_t",
    "weight_quant",
    "fp8_gemm",
    "act_dequant",
    "weight_dequant",
    "backend",
    "BLOCK",
    "FP8",
    "FP8_MAX",
]
BACKENDS = ("auto", "triton", "torch")
BLOCK = _quant.BLOCK
FP8 = _quant.FP8
FP8_MAX = _quant.FP8_MAX


def backend(t: torch.Tensor) -> str:
    """'triton' or 'torch': what runs for tensor ``t`` (see the module docstring)."""
    choice = os.environ.get("DSV3LITE_FP8_BACKEND", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"DSV3LITE_FP8_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice != "auto":
        return choice
    if _triton.AVAILABLE and t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9):
        return "triton"
    return "torch"


def act_quant(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations in 1×``block_size`` tiles (per token, per 128 channels).

    x [..., K] float32/bfloat16/float16 → q [..., K] E4M3 and s [..., ceil(K / block_size)]
    float32 with x ≈ q · s. ``scale_fmt="ue8m0"`` rounds scales up to powers of two.
    """
    if backend(x) == "triton":
        return _quant.act_quant_triton(x, block_size, scale_fmt)
    _validate(x, block_size, scale_fmt)
    return _quant.act_quant_ref(x, block_size, scale_fmt)


def act_quant_t(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations in ``block_size``×1 tiles (per channel, per 128 tokens), transposed.

    x [..., K] with M tokens in all → qT [K, M_pad] E4M3 and sT [K, M_pad / block_size],
    M_pad = M rounded up to the block (the padding is zeros): a ready operand for the Wgrad
    GEMM, which reduces over tokens. xᵀ ≈ qT · sT on the first M columns.
    """
    if backend(x) == "triton":
        return _quant.act_quant_t_triton(x, block_size, scale_fmt)
    _validate(x, block_size, scale_fmt)
    return _quant.act_quant_t_ref(x, block_size, scale_fmt)


def weight_quant(
    w: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [N, K] in ``block_size``×``block_size`` blocks.

    → q [N, K] E4M3 and s [ceil(N / block_size), ceil(K / block_size)] float32, w ≈ q · s
    block by block (the layout of the release's ``weight_scale_inv``). Stacked experts
    [E, N, K] give s [E, ⌈N/128⌉, ⌈K/128⌉]: each expert's blocks are its own.
    """
    if backend(w) == "triton":
        return _quant.weight_quant_triton(w, block_size, scale_fmt)
    _quant.check_weight(w)
    _validate(w, block_size, scale_fmt)
    return _quant.weight_quant_ref(w, block_size, scale_fmt)


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a @ b.T from E4M3 operands: a [..., K] with a_s [..., K/128] (1×128 tiles), b [N, K]
    with b_s [ceil(N/128), K/128] (128×128 blocks) or [N, K/128] (per row, for Wgrad).

    FP32 accumulation, promoted every 128 of K (§3.3.2); K must be a multiple of 128.
    Returns [..., N] in ``out_dtype`` (bfloat16, float16 or float32).
    """
    if backend(a) == "triton":
        return _gemm.fp8_gemm_triton(a, a_s, b, b_s, out_dtype)
    return _gemm.fp8_gemm_ref(a, a_s, b, b_s, out_dtype)


def _validate(x: torch.Tensor, block_size: int, scale_fmt: str | None) -> None:
    """The Triton launchers' checks, so that both backends refuse the same inputs alike."""
    _quant.check_input(x, "x")
    _quant.check_block_size(block_size)
    _quant.check_scale_fmt(scale_fmt)
