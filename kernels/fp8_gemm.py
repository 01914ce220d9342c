"""Block-scaled FP8 GEMM with FP32 promotion every 128 of K (report §3.3.2, Figure 7b).

``fp8_gemm(a, a_s, b, b_s)`` computes ``a @ b.T`` from E4M3 operands and their scales:

    C[m, n] = Σ_kb  a_s[m, kb] · b_s[·, kb] · Σ_{k in block kb} a[m, k] · b[n, k]

The inner sum is one 128-wide tensor-core ``tl.dot`` on the raw codes; the outer sum runs on
the CUDA cores in FP32. That split *is* the report's two ideas at once:

* fine-grained scales are "per-group scaling factors along the inner dimension K": they are
  constant inside one 128-wide K step, so they can be applied after that step's dot;
* promotion: the report measures that Hopper's FP8 tensor cores keep only about 14 bits
  while accumulating, a ~2% error at K = 4096 (``dsv3lite/fp8/numerics.py`` reproduces it).
  Here the tensor core never accumulates more than N_C = 128 products (4 WGMMAs of K = 32,
  the report's choice); each partial is scaled and added into a full-FP32 accumulator.

``b_s`` comes in two shapes, told apart by its number of rows:

* ``[ceil(N / 128), K / 128]`` — a weight's 128×128 blocks (Fprop, and Dgrad with the
  transposed weight, whose blocks are the transposed blocks);
* ``[N, K / 128]``             — one scale per row per 128 of K (Wgrad, where ``b`` is the
  activation quantized in 128×1 tiles along tokens and transposed, see ``act_quant_t``).

Both are the same kernel: the scale of output column n is read at row ``n // B_SCALE_ROWS``
with B_SCALE_ROWS = 128 or 1. (N = 1 is both shapes at once, and both readings agree.)

The kernel, step by step (the order of Triton's matmul tutorial):

1. Program ids are grouped GROUP_M tiles at a time along M, so that concurrently running
   programs share rows of ``a`` and columns of ``b`` in L2.
2. Row and column offsets wrap around (``% M``, ``% N``): edge tiles read valid rows twice
   instead of masking every load; only the final store is masked. K is a multiple of 128,
   so the K loop needs no mask at all.
3. Each iteration loads a [BLOCK_M, 128] tile of ``a`` and a [128, BLOCK_N] tile of ``bᵀ``
   (K contiguous in both, the K-major layout FP8 WGMMA requires), their scales, takes the
   dot, multiplies it by the outer product of the scales and adds it to the accumulator.
4. The FP32 accumulator is cast to the output dtype once, at the end.

Speed measured on one H200 (triton 3.6, a probe over tile shapes): tiles 64×128 with 4 warps or 64×256 with 8 warps,
3–4 pipeline stages reached 620–680 TFLOP/s, about 0.6× cuBLAS's blockwise FP8 GEMM. The
scaling multiply waits on each MMA; hiding it needs two warpgroups ping-ponging (DeepGEMM)
or Gluon's explicit async WGMMA, which plain Triton does not express. Tried there and worse:
warp specialisation, TMA descriptors alone, two 128-blocks per iteration, and delaying each
block's scale by one iteration (it broke the software pipeliner).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .fp8_quant import BLOCK, FP8, INTERPRETED, check_device

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------ validation
def check_operands(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor
) -> tuple[int, int, int, int]:
    """Validate a GEMM's operands; return (M, N, K, B_SCALE_ROWS).

    ``a`` [..., K] and ``b`` [N, K] are E4M3 with unit stride along K; ``a_s`` [..., K/128]
    and ``b_s`` float32 in one of the two shapes above, any strides (row-major as the
    quantizers write them, or column-major as cuBLAS wants them).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != FP8:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a torch.float8_e4m3fn tensor, got {got}")
    if b.dim() != 2:
        raise ValueError(f"b must be 2-D [N, K], got shape {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"a must be [..., M, K], got shape {tuple(a.shape)}")
    k = a.shape[-1]
    if b.shape[1] != k:
        raise ValueError(f"a [..., K={k}] and b [N, K={b.shape[1]}] disagree on K")
    if k == 0 or k % BLOCK:
        raise ValueError(
            f"K must be a positive multiple of {BLOCK} (one scale per {BLOCK} of K), got K={k}; "
            "zero-pad both operands along K (FP8Linear does)"
        )
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(
            "a and b must be K-major (unit stride along K), got strides "
            f"{a.stride()} and {b.stride()}; call .contiguous() on a transposed operand"
        )
    m, n, kb = a.numel() // k, b.shape[0], k // BLOCK
    for name, s in (("a_s", a_s), ("b_s", b_s)):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{name} must be a float32 tensor, got {got}")
    if tuple(a_s.shape) != (*a.shape[:-1], kb):
        raise ValueError(
            f"a_s must have shape {(*a.shape[:-1], kb)} (one scale per row per {BLOCK} of K), "
            f"got {tuple(a_s.shape)}"
        )
    blocks = (triton.cdiv(n, BLOCK), kb)
    if tuple(b_s.shape) == blocks:
        scale_rows = BLOCK
    elif tuple(b_s.shape) == (n, kb):
        scale_rows = 1
    else:
        raise ValueError(
            f"b_s must have shape {blocks} ({BLOCK}×{BLOCK} blocks) or {(n, kb)} (per row, "
            f"per {BLOCK} of K), got {tuple(b_s.shape)}"
        )
    devices = {t.device for t in (a, a_s, b, b_s)}
    if len(devices) > 1:
        raise ValueError(f"a, a_s, b, b_s must be on one device, got {sorted(map(str, devices))}")
    return m, n, k, scale_rows


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


# ------------------------------------------------------------------------------ torch reference
def fp8_gemm_ref(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's numerics in plain torch: per 128-block of K, an FP32 matmul of the codes,
    scaled, added into an FP32 accumulator. The codes' products are exact in FP32 and a
    128-term sum loses at most a few FP32 ulps, so this is the exact dequantized product to
    ~1e-7 (relative) — the report's promoted accumulation, not the tensor core's 14 bits."""
    m, n, k, scale_rows = check_operands(a, a_s, b, b_s)
    _check_out_dtype(out_dtype)
    a2, as2 = a.reshape(m, k), a_s.reshape(m, k // BLOCK)
    bs_rows = b_s.float().repeat_interleave(scale_rows, dim=0)[:n]  # [N, K/128]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for kb in range(k // BLOCK):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        dot = a2[:, cols].float() @ b[:, cols].float().t()
        acc += dot * (as2[:, kb, None] * bs_rows[None, :, kb])
    result = acc.to(out_dtype).view(*a.shape[:-1], n)
    return result if out is None else out.copy_(result)  # ``out`` as the kernel takes it


# ------------------------------------------------------------------------------ Triton
@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    M,
    N,
    K,
    M_BUCKET,  # only an autotuning key (see _tuned_kernel)
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # 1. grouped program order: walk GROUP_M tiles down M before moving right along N
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    # 2. wrapped offsets: edge tiles re-read valid rows, the store masks them out
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]  # bᵀ tile, K contiguous
    a_s_ptrs = a_s_ptr + offs_m * stride_asm
    b_s_ptrs = b_s_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn

    # 3. one 128-wide K step per iteration, promoted into FP32 with its scales
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        a_s = tl.load(a_s_ptrs + kb * stride_ask)
        b_s = tl.load(b_s_ptrs + kb * stride_bsk)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    # 4. one cast, one masked store
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# Tile configurations for the H200 (the best of a wider probe there). 128×128 with 8
# warps is the usual large-tile choice; it stays as a candidate for shapes the probe missed.
CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
]

# Tuned per (M, N, K), with M rounded up to a power of two: the experts of an MoE see a
# different number of tokens every step, and timing all configs for each would cost more
# than it saves. The interpreter cannot time anything: it runs CONFIGS[0] directly.
_tuned_kernel = triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K"])(_fp8_gemm_kernel)


def fp8_gemm_triton(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton ``fp8_gemm``: same contract as ``fp8_gemm_ref``; writes into ``out`` if given."""
    m, n, k, scale_rows = check_operands(a, a_s, b, b_s)
    _check_out_dtype(out_dtype)
    check_device(a)
    a2, as2 = a.reshape(m, k), a_s.reshape(m, k // BLOCK)
    shape = (*a.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=a.device)
    if out.dtype != out_dtype or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {shape}")
    if m == 0 or n == 0:
        return out
    args = (
        a2,
        b,
        out,
        as2,
        b_s,
        m,
        n,
        k,
        triton.next_power_of_2(m),
        a2.stride(0),
        b.stride(0),
        n,
        as2.stride(0),
        as2.stride(1),
        b_s.stride(0),
        b_s.stride(1),
    )
    meta = {"B_SCALE_ROWS": scale_rows, "BLOCK_K": BLOCK, "GROUP_M": 8}
    if INTERPRETED:
        cfg = CONFIGS[0].kwargs
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _fp8_gemm_kernel[grid](*args, **meta, **cfg)
    else:

        def grid(c):
            return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)

        _tuned_kernel[grid](*args, **meta)
    return out
