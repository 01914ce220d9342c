"""FP8 quantization with fine-grained scales (report §3.3.2), in Triton and in plain torch.

Every quantizer here maps a group of values to E4M3 with one float32 scale per group, in the
convention of the release's ``inference/kernel.py``: ``x ≈ q · s``. The scale comes online
from the group's largest magnitude, ``s = amax / 448``, so that the group's largest entry lands
on E4M3's largest finite value (448) and nothing overflows. The three groupings the report
uses (Figure 7a):

* ``act_quant``    — activations, 1×128 tiles: one scale per token per 128 channels;
* ``act_quant_t``  — activations for Wgrad, 128×1 tiles: one scale per channel per 128 tokens.
  Wgrad reduces over tokens, and a GEMM wants its reduction dimension contiguous, so this
  kernel writes the *transposed* codes (channels × tokens) in the same pass: the fused
  quantize-and-transpose that §3.5.2 asks hardware for, done here in software;
* ``weight_quant`` — weights, 128×128 blocks (of one matrix, or of each of stacked experts').

Why groups and not one scale per tensor: an outlier sets the scale of everything that shares
it. With one scale per 1×128 tile an outlier channel only coarsens the 127 neighbours in its
own tile (see ``dsv3lite/fp8/numerics.py``).

The rules every quantizer follows (a zero group, ±Inf, NaN, UE8M0 scales) are documented
once, in ``dsv3lite/fp8/quant.py``, the API the rest of the package calls; the torch references
here and the kernels implement them alike.

Rounding. GPUs round float32 → E4M3 to nearest-even; so does torch. Triton's CPU interpreter
(``TRITON_INTERPRET=1``) does not: it rounds ties up, truncates subnormals and turns values
that round past 448 or NaN into wrong codes. So the kernels round to the E4M3 grid themselves
(``_round_to_e4m3``) and only then cast, which is exact on every backend: the GPU, the
interpreter and the torch reference produce the same bytes.
"""

from __future__ import annotations

import math

import torch

from ._triton import INTERPRETED, require, tl, triton

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: E4M3's largest finite value
BLOCK = 128  # the report's group size N_C: 1×128 tiles, 128×128 blocks
SCALE_FMTS = (None, "ue8m0")


# ------------------------------------------------------------------------------ validation
def check_block_size(block_size: int) -> None:
    """Group sizes are powers of two (Triton tiles are), at least 16 (a tensor-core K step)."""
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")


def check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def check_input(x: torch.Tensor, name: str) -> None:
    """A floating tensor in a format we read (not FP8 already), with a non-empty last dim."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float32, bfloat16 or float16 tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got {tuple(x.shape)}")


def check_weight(w: torch.Tensor) -> None:
    """A weight [N, K], or stacked experts' weights [E, N, K]."""
    check_input(w, "w")
    if w.dim() not in (2, 3):
        raise ValueError(f"w must be 2-D [N, K] or 3-D [E, N, K], got shape {tuple(w.shape)}")


def _check_out(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(
            f"out {name} must be a contiguous {dtype} tensor of shape {shape}, "
            f"got {t.dtype} {tuple(t.shape)} (contiguous={t.is_contiguous()})"
        )


# ------------------------------------------------------------------------------ torch reference
def _finite_amax(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """max |x| over ``dim``, ignoring NaN and ±Inf (they get codes of their own, see above)."""
    a = x.abs()
    return torch.where(torch.isfinite(a), a, 0.0).amax(dim)


def scale_from_amax(
    amax: torch.Tensor, scale_fmt: str | None = None, fmt_max: float = FP8_MAX
) -> torch.Tensor:
    """s = amax / fmt_max (448 for E4M3), optionally rounded up to a power of two; 1 for an
    all-zero group.

    The power-of-two rounding works on the bits: adding 2^23 - 1 to a positive float32 carries
    into the exponent unless the mantissa is already zero; clearing the mantissa then leaves
    2^ceil(log2 s). The kernels do the same, so both round identically.
    """
    s = amax.float() / fmt_max
    if scale_fmt == "ue8m0":
        s = ((s.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(s > 0, s, 1.0)


def encode_ref(x: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = FP8) -> torch.Tensor:
    """Codes of x / s in ``dtype``: saturated to its largest finite value (Inf included), NaN
    kept, rounded to nearest."""
    fmt_max = torch.finfo(dtype).max
    return (x.float() / s).clamp(-fmt_max, fmt_max).to(dtype)


def group_quant_ref(
    x: torch.Tensor,
    rows: int,
    cols: int,
    scale_fmt: str | None = None,
    dtype: torch.dtype = FP8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one quantizer behind every grouping: x [..., M, K] in groups of rows × cols over
    the last two dims → codes like x and s [..., ceil(M / rows), ceil(K / cols)] float32.

    Edge groups of a dimension that is not a multiple of the group are smaller; the zero
    padding used to compute them never raises a group's amax. ``dtype`` is E4M3 everywhere in
    the package; the numerics study also asks what E5M2 would give, hence the argument.
    """
    *lead, m, k = x.shape
    mb, kb = math.ceil(m / rows), math.ceil(k / cols)
    xp = torch.nn.functional.pad(x.float(), (0, kb * cols - k, 0, mb * rows - m))
    groups = xp.view(*lead, mb, rows, kb, cols)
    s = scale_from_amax(_finite_amax(groups, (-3, -1)), scale_fmt, torch.finfo(dtype).max)
    q = encode_ref(groups, s[..., :, None, :, None], dtype).view(*lead, mb * rows, kb * cols)
    return q[..., :m, :k].contiguous(), s


def act_quant_ref(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """1×block tiles along the last dim: q like x (E4M3), s [..., ceil(K / block)] float32."""
    q, s = group_quant_ref(x.reshape(-1, 1, x.shape[-1]), 1, block_size, scale_fmt)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


def act_quant_t_ref(
    x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """block×1 tiles along tokens, transposed: x [..., K] (M tokens) → qT [K, M_pad] and
    sT [K, M_pad / block], M_pad = M rounded up to the block, the padding all zeros.

    The 128×1 quantization of x is the 1×128 quantization of xᵀ: that is all this does.
    """
    x2 = x.reshape(-1, x.shape[-1])
    m_pad = math.ceil(x2.shape[0] / block_size) * block_size
    xt = torch.nn.functional.pad(x2.float(), (0, 0, 0, m_pad - x2.shape[0])).t()
    return act_quant_ref(xt, block_size, scale_fmt)


def weight_quant_ref(
    w: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """block×block blocks: w [N, K] or stacked experts [E, N, K] → q like w (E4M3) and
    s [(E,) ceil(N / block), ceil(K / block)] float32, each expert's blocks its own."""
    return group_quant_ref(w, block_size, block_size, scale_fmt)


def expand_scales(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """One scale per (block[0] × block[1]) group of the last two dims, broadcast back to every
    element of ``shape`` (those two dims); leading dims (stacked experts) pass through."""
    s = s.float().repeat_interleave(block[0], dim=-2)[..., : shape[0], :]
    return s.repeat_interleave(block[1], dim=-1)[..., : shape[1]]


def act_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    """q · s for 1×block tiles (the inverse of ``act_quant``), float32, any leading dims."""
    k = q.shape[-1]
    q2, s2 = q.reshape(-1, k), s.reshape(-1, s.shape[-1])
    return (q2.float() * expand_scales(s2, tuple(q2.shape), (1, block_size))).view(q.shape)


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    """q · s for block×block blocks (the inverse of ``weight_quant``), float32, [N, K] or
    stacked [E, N, K]."""
    return q.float() * expand_scales(s, tuple(q.shape[-2:]), (block_size, block_size))


# ------------------------------------------------------------------------------ Triton
# The shared pieces first. Each is a @triton.jit function inlined into the kernels below.
@triton.jit
def _finite_amax_tl(x, axis: tl.constexpr):
    """max |x| along ``axis`` (None: the whole tile), NaN and ±Inf ignored: a comparison with
    NaN is false, and Inf is above the largest float32."""
    a = tl.abs(x)
    return tl.max(tl.where(a <= 3.4028234663852886e38, a, 0.0), axis=axis)


@triton.jit
def _scale_tl(amax, UE8M0: tl.constexpr):
    """s = amax / 448 (division rounded to nearest, as torch's), power of two if UE8M0, else
    1 for an all-zero group. ``/`` in Triton is an approximate division on GPUs: div_rn is not."""
    s = tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if UE8M0:
        s = ((s.to(tl.uint32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _round_to_e4m3(y):
    """Round float32 |y| ≤ 448 to the nearest E4M3 value, ties to even, on every backend.

    Normal range (|y| ≥ 2^-6): E4M3 keeps 3 of float32's 23 mantissa bits, so drop the low 20
    with the integer round-to-nearest-even trick (add 0x7FFFF plus the last kept bit, then
    clear); a carry into the exponent is the correct result. Subnormal range: the grid is
    uniform, step 2^-9, and adding then subtracting 1.5 · 2^14 (whose float32 ulp is 2^-9)
    lets the float32 adder do the rounding.
    """
    bits = y.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits ^ sign
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
    a = mag.to(tl.float32, bitcast=True)
    subnormal = ((a + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)
    mag = tl.where(a < 0.015625, subnormal, normal)
    return (mag | sign).to(tl.float32, bitcast=True)


@triton.jit
def _encode_tl(x, s, INTERPRET: tl.constexpr):
    """E4M3 codes (as uint8) of x / s: saturated, rounded, NaN kept (``dsv3lite.fp8.quant``).

    On a GPU the cast itself rounds to nearest-even (cvt.rn.satfinite); the bit-level rounding
    is needed only by the interpreter, and costs half the bandwidth on an H200 (measured:
    1,710 vs 3,330 GB/s for act_quant on 16384×7168 bf16), so it is compiled in only there.
    """
    y = tl.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)  # ±Inf → ±448; NaN is handled last
    if INTERPRET:
        y = _round_to_e4m3(y)
    code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(x != x, 0x7F, code).to(tl.uint8)  # 0x7F: E4M3's NaN, S.1111.111


# 1×128 activation tiles. One program quantizes BLOCK_M rows × one group of GROUP channels:
# it loads the tile, takes the max over each row's group, scales, rounds and stores codes and
# BLOCK_M scales. Rows and channels past the tensor's edge are masked (loaded as 0, not stored).
@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = _scale_tl(_finite_amax_tl(x, 1), UE8M0)
    code = _encode_tl(x, s[:, None], INTERPRET)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], code, mask=mask)
    tl.store(s_ptr + rows * stride_sm + group, s, mask=rows < M)


# 128×1 tiles for Wgrad, transposed on the way out. One program takes GROUP tokens × BLOCK_K
# channels, reduces over the tokens (axis 0) to get one scale per channel, and stores the tile
# transposed so that the output is channels × tokens with tokens contiguous. tl.trans moves
# the tile through registers/shared memory, so both the load and the store stay coalesced.
# Tokens past M are loaded as zeros and *stored*: the output is padded to a whole group.
@triton.jit
def _act_quant_t_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qk,
    stride_sk,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    group = tl.program_id(0)
    tokens = group * GROUP + tl.arange(0, GROUP)
    chans = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (tokens[:, None] < M) & (chans[None, :] < K)
    x = tl.load(x_ptr + tokens[:, None] * stride_xm + chans[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    s = _scale_tl(_finite_amax_tl(x, 0), UE8M0)
    code_t = tl.trans(_encode_tl(x, s[None, :], INTERPRET))  # [BLOCK_K, GROUP]
    tl.store(q_ptr + chans[:, None] * stride_qk + tokens[None, :], code_t, mask=chans[:, None] < K)
    tl.store(s_ptr + chans * stride_sk + group, s, mask=chans < K)


# 128×128 weight blocks: one program per block, one scale per program; the third grid axis
# walks stacked experts, each a weight of its own.
@triton.jit
def _weight_quant_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n, pid_k, pid_e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * GROUP + tl.arange(0, GROUP)
    cols = pid_k * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w_ptr += pid_e.to(tl.int64) * stride_we
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = _scale_tl(_finite_amax_tl(w, None), UE8M0)
    code = _encode_tl(w, s, INTERPRET)
    q_ptr += pid_e.to(tl.int64) * stride_qe
    tl.store(q_ptr + rows[:, None] * stride_qn + cols[None, :], code, mask=mask)
    tl.store(s_ptr + pid_e * stride_se + pid_n * stride_sn + pid_k, s)


def check_device(t: torch.Tensor) -> None:
    """Triton needs a CUDA tensor, or a CPU tensor under the interpreter."""
    require()
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(
            "the Triton FP8 kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "dsv3lite.kernels is imported to run them on the CPU; got a tensor on "
            f"{t.device}. The torch reference (dsv3lite.fp8 on CPU tensors) needs neither."
        )


def act_quant_triton(
    x: torch.Tensor,
    block_size: int = BLOCK,
    scale_fmt: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``act_quant``: same contract as ``act_quant_ref``; writes into ``out`` if given."""
    check_input(x, "x")
    check_block_size(block_size)
    check_scale_fmt(scale_fmt)
    check_device(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, groups = x2.shape[0], math.ceil(k / block_size)
    if out is None:
        out = (
            torch.empty(x.shape, dtype=FP8, device=x.device),
            torch.empty(*x.shape[:-1], groups, dtype=torch.float32, device=x.device),
        )
    q, s = out
    _check_out(q, FP8, tuple(x.shape), "q")
    _check_out(s, torch.float32, (*x.shape[:-1], groups), "s")
    if m == 0:
        return q, s
    block_m = 16  # measured on an H200: 16 rows × 128 channels per program, 4 warps, is best
    grid = (triton.cdiv(m, block_m), groups)
    _act_quant_kernel[grid](
        x2,
        q.view(torch.uint8),
        s,
        m,
        k,
        x2.stride(0),
        k,
        groups,
        BLOCK_M=block_m,
        GROUP=block_size,
        UE8M0=scale_fmt == "ue8m0",
        INTERPRET=INTERPRETED,
        num_warps=4,
    )
    return q, s


def act_quant_t_triton(
    x: torch.Tensor,
    block_size: int = BLOCK,
    scale_fmt: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``act_quant_t``: same contract as ``act_quant_t_ref``; writes into ``out``."""
    check_input(x, "x")
    check_block_size(block_size)
    check_scale_fmt(scale_fmt)
    check_device(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    groups = math.ceil(m / block_size)
    m_pad = groups * block_size
    if out is None:
        out = (
            torch.empty(k, m_pad, dtype=FP8, device=x.device),
            torch.empty(k, groups, dtype=torch.float32, device=x.device),
        )
    q, s = out
    _check_out(q, FP8, (k, m_pad), "q")
    _check_out(s, torch.float32, (k, groups), "s")
    if m == 0:
        return q, s
    block_k = 64  # 64 channels: 128-byte rows of bf16 in, 128-byte rows of codes out
    grid = (groups, triton.cdiv(k, block_k))
    _act_quant_t_kernel[grid](
        x2,
        q.view(torch.uint8),
        s,
        m,
        k,
        x2.stride(0),
        m_pad,
        groups,
        BLOCK_K=block_k,
        GROUP=block_size,
        UE8M0=scale_fmt == "ue8m0",
        INTERPRET=INTERPRETED,
        num_warps=4,
    )
    return q, s


def weight_quant_triton(
    w: torch.Tensor,
    block_size: int = BLOCK,
    scale_fmt: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``weight_quant``: same contract as ``weight_quant_ref`` ([N, K] or stacked
    [E, N, K]); writes into ``out`` if given."""
    check_weight(w)
    check_block_size(block_size)
    check_scale_fmt(scale_fmt)
    check_device(w)
    if not w.is_contiguous():
        w = w.contiguous()
    w3 = w.view(-1, *w.shape[-2:])
    e, n, k = w3.shape
    nb, kb = math.ceil(n / block_size), math.ceil(k / block_size)
    lead = tuple(w.shape[:-2])
    if out is None:
        out = (
            torch.empty(w.shape, dtype=FP8, device=w.device),
            torch.empty(*lead, nb, kb, dtype=torch.float32, device=w.device),
        )
    q, s = out
    _check_out(q, FP8, tuple(w.shape), "q")
    _check_out(s, torch.float32, (*lead, nb, kb), "s")
    if n == 0 or e == 0:
        return q, s
    _weight_quant_kernel[(nb, kb, e)](
        w3,
        q.view(torch.uint8),
        s,
        n,
        k,
        n * k,
        k,
        n * k,
        k,
        nb * kb,
        kb,
        GROUP=block_size,
        UE8M0=scale_fmt == "ue8m0",
        INTERPRET=INTERPRETED,
        num_warps=8,
    )
    return q, s
