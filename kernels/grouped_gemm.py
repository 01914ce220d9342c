"""Grouped expert GEMMs for DeepSeekMoE: one launch over all experts, tokens grouped by expert.

A routed MoE layer (report §2.1.2, eq. 12) sends each token to K_r of N_r experts. Run expert by
expert, that is N_r small GEMMs of uneven sizes — 256 launches per layer for DeepSeek-V3, most
of them tiny at decode time. Instead:

1. **Permute** (``moe_permute``): sort the (token, expert) pairs by expert. Expert e then owns
   the contiguous rows ``offsets[e] : offsets[e+1]`` of the sorted order; ``src_rows`` says
   which token each sorted row reads. Nothing here leaves the GPU (no per-expert host sync).
2. **Grouped GEMM** (``grouped_gemm``): one kernel computes y[r] = x[src_rows[r]] · W[e(r)]ᵀ for
   every sorted row. Its grid is an upper bound on the number of (expert, m-tile) pairs,
   Σ_e ⌈n_e / BLOCK_M⌉ ≤ ⌈M / BLOCK_M⌉ + E, times the n-tiles; each program reads the offsets
   (E + 1 ints), counts the m-tiles of every expert with a prefix sum, finds its own expert
   and rows, and returns at once if it is past the last tile. So there is no host-side tile
   list and zero-token experts cost nothing. The gather of token rows happens in the loads
   (``src_rows``): the permuted copy of the activations is never written. With ``swiglu`` the
   weight is [E, 2I, K] (gate rows, then up rows, like a fused ``gate_up_proj``) and the program
   keeps two accumulators, emitting silu(g)·u: the gate and up outputs never reach memory.
3. **Combine** (``moe_combine``): each token sums its K_r rows weighted by g_{i,t} in fp32 — a
   gather over the inverse permutation rather than a scatter-add, so it needs no atomics and
   is deterministic.

``moe_forward`` chains the three for one layer's routed experts (inference: no gradient).

**Training** (``moe_experts``, what ``Experts.impl = "triton"`` runs): the rows arrive sorted
(the model's ``sort_pairs``), the forward is the fused SwiGLU GEMM then the down GEMM, and the
backward is grouped too — dX = dY·W, a ``grouped_gemm`` on a transposed view of the stack (the
kernel takes any K stride), and dW_e = dY_eᵀ·X_e, ``grouped_wgrad``: one program per output
tile of one expert, reducing over that expert's rows.

``grouped_gemm_reference`` (a loop over experts in torch) is what the tests check the kernel
against, and ``python -m dsv3lite bench moe`` times the kernel against ``torch._grouped_mm`` and that loop.

``grouped_gemm_fp8`` is the same kernel on E4M3 operands with the report's fine-grained
scaling (§3.3.2): 1×128 tiles of activations and 128×128 blocks of weights, each 128-deep
partial product scaled and added to an fp32 accumulator. Its operands come from the package's
one quantizer, ``dsv3lite.fp8``: ``act_quant`` for the rows, ``weight_quant`` for the stacked
expert weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton import INTERPRETED, require, tl, triton

DTYPES = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
SMEM_BYTES = 200 * 1024  # of the H200's 227 KiB per block, with room for the epilogue


@triton.jit
def _grouped_gemm_kernel(
    X,  # [rows of x, K]; row r of the product reads row SRC_ROWS[r] (or r)
    W,  # [E, N or 2N, K]
    Y,  # [M, N]
    OFFSETS,  # [E + 1] int32, offsets[E] = M
    SRC_ROWS,  # [M] int32 (only read when GATHER)
    X_SCALES,  # [rows of x, K / 128] fp32, 1×128 tiles (only read when FP8)
    W_SCALES,  # [E, ⌈(N or 2N) / 128⌉, K / 128] fp32, 128×128 blocks (only read when FP8)
    n_experts,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_xsm,
    stride_wse,
    stride_wsn,
    rows_bucket,  # the autotuning key only: next power of two of M
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GATHER: tl.constexpr,
    SWIGLU: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Grouped ordering (as in Triton's matmul tutorial): GROUP_M consecutive m-tiles — mostly
    # of one expert — sweep the n-tiles together, so each weight tile is reused from L2.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    n_tiles_m = tl.num_programs(0) // n_tiles_n
    group = pid // (GROUP_M * n_tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * n_tiles_n)) % group_size
    tile_n = (pid % (GROUP_M * n_tiles_n)) // group_size

    # Tile scheduler: m-tiles of expert e are numbered from Σ_{e'<e} ⌈n_e' / BLOCK_M⌉.
    e = tl.arange(0, BLOCK_E)
    e_ok = e < n_experts
    starts = tl.load(OFFSETS + e, mask=e_ok, other=0)
    ends = tl.load(OFFSETS + e + 1, mask=e_ok, other=0)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    tiles_end = tl.cumsum(tiles, axis=0)
    if tile_m >= tl.sum(tiles, axis=0):
        return
    expert = tl.sum((tiles_end <= tile_m).to(tl.int32), axis=0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, starts, 0), axis=0) + (tile_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), axis=0)

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past this expert's last and columns past N re-read valid memory and are not stored:
    # the loads stay unmasked in M and N.
    rows_in = tl.minimum(rows, row_end - 1)
    if GATHER:
        rows_in = tl.load(SRC_ROWS + rows_in)
    cols_in = tl.minimum(cols, N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows_in.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + expert.to(tl.int64) * stride_we + cols_in[None, :] * stride_wn
    w_ptrs += offs_k[:, None] * stride_wk

    # FP8: the scales of this tile's rows (1×128 activation tiles) and columns (128×128 weight
    # blocks), advanced one 128-wide K block per iteration.
    xs_ptrs = X_SCALES + rows_in.to(tl.int64) * stride_xsm
    ws_ptrs = W_SCALES + expert.to(tl.int64) * stride_wse + (cols_in // 128) * stride_wsn
    ws_up_ptrs = W_SCALES + expert.to(tl.int64) * stride_wse + ((cols_in + N) // 128) * stride_wsn

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # unused unless SWIGLU
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if SWIGLU:
            b_up = tl.load(w_ptrs + N * stride_wn, mask=k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            if SWIGLU:
                b_up = b_up.to(tl.float32)
        if FP8:
            # Report §3.3.2: each 128-deep partial product is scaled and promoted to the fp32
            # accumulator on the CUDA cores (N_C = 128), which bounds the error of the tensor
            # cores' limited-precision FP8 accumulation.
            sa = tl.load(xs_ptrs)[:, None]
            acc += tl.dot(a, b) * (sa * tl.load(ws_ptrs)[None, :])
            if SWIGLU:
                acc_up += tl.dot(a, b_up) * (sa * tl.load(ws_up_ptrs)[None, :])
            xs_ptrs += 1
            ws_ptrs += 1
            ws_up_ptrs += 1
        else:
            acc = tl.dot(a, b, acc)
            if SWIGLU:
                acc_up = tl.dot(a, b_up, acc_up)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if SWIGLU:  # silu(g)·u from the fp32 accumulators: g and u are never rounded
        acc = acc * tl.sigmoid(acc) * acc_up
    y_ptrs = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(
        y_ptrs, acc.to(Y.dtype.element_ty), mask=(rows < row_end)[:, None] & (cols < N)[None, :]
    )


def _gemm_configs() -> list[triton.Config]:
    """Hopper bf16 tiles (wgmma wants 64-row multiples per warpgroup), plus small-M tiles for
    decode, where an expert sees a handful of rows and the weights dominate the bytes."""
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 8, 4),
        (64, 128, 64, 4, 4),
        (16, 128, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (16, 256, 64, 4, 5),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _fp8_configs() -> list[triton.Config]:
    """BLOCK_K is the 128-wide scaling block. Measured on the H200: plain Triton's block-scaled
    fp8 does best at 64×128 (4 warps) or 64×256 (8 warps) with 3–4 stages on the H200."""
    shapes = [
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 4),
        (128, 64, 8, 3),
        (16, 128, 4, 4),
        (32, 128, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 128}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


def _fit(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles whose fp32 tiles exceed 128 registers a thread (they would spill) and cut
    pipeline stages to fit in shared memory. SwiGLU doubles the weight tiles and the
    accumulators; FP8 keeps each block's partial product beside the accumulator."""
    fp8 = kwargs.get("FP8", False)
    parts = 2 if kwargs.get("SWIGLU", False) else 1
    size = 1 if fp8 else 2  # bytes per element
    fitted = []
    for c in configs:
        m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if m * n * parts * (2 if fp8 else 1) > 128 * 32 * c.num_warps:
            continue
        stages = min(c.num_stages, SMEM_BYTES // (size * k * (m + parts * n)))
        if stages >= 2:
            fitted.append(triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=stages))
    return fitted


_KEY = ["N", "K", "n_experts", "rows_bucket", "stride_wk", "GATHER", "SWIGLU"]
_grouped_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=_KEY, prune_configs_by={"early_config_prune": _fit}
)(_grouped_gemm_kernel)
_grouped_gemm_fp8_tuned = triton.autotune(
    configs=_fp8_configs(), key=_KEY, prune_configs_by={"early_config_prune": _fit}
)(_grouped_gemm_kernel)

_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
GROUP_M = 8


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    src_rows: torch.Tensor | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """Rows grouped by expert times each expert's weight, in one launch.

    Args:
        x: [rows, K] bf16/fp16. Without ``src_rows`` the rows are already sorted by expert.
        w: [E, N, K] — expert e's weight, row-major like ``nn.Linear.weight`` (or a
            transposed view of a stack [E, K, N]) — or, with ``swiglu``, [E, 2I, K]: gate rows
            then up rows.
        offsets: [E + 1] int, non-decreasing, from 0 to M: expert e owns sorted rows
            offsets[e] : offsets[e+1] (trusted: reading them back would cost a sync).
        src_rows: [M] int — sorted row r reads x[src_rows[r]] (the permutation, fused).
        swiglu: return silu(x·W_gateᵀ) · (x·W_upᵀ), [M, I].

    Returns:
        [M, N] (or [M, I]) in x's dtype, accumulated in fp32.
    """
    _check_gemm(x, w, offsets, src_rows, swiglu, DTYPES)
    return _launch(x, w, offsets, src_rows, swiglu, x.dtype, None)


def grouped_gemm_fp8(
    x: torch.Tensor,
    x_scales: torch.Tensor,
    w: torch.Tensor,
    w_scales: torch.Tensor,
    offsets: torch.Tensor,
    *,
    src_rows: torch.Tensor | None = None,
    swiglu: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``grouped_gemm`` on FP8 (E4M3) operands with DeepSeek-V3's fine-grained scales (§3.3.2).

    Args:
        x: [rows, K] float8_e4m3fn with ``x_scales`` [rows, K/128] fp32: x ≈ x_q · s per 1×128
            tile (``dsv3lite.fp8.act_quant``). Quantize before permuting: ``src_rows`` gathers
            both.
        w: [E, N, K] float8_e4m3fn with ``w_scales`` [E, ⌈N/128⌉, K/128] fp32 per 128×128 block
            (``dsv3lite.fp8.weight_quant``; the release's ``weight_scale_inv``).
        offsets, src_rows, swiglu: as in ``grouped_gemm``; K must be a multiple of 128.
        out_dtype: bf16, fp16 or fp32.
    """
    _check_gemm(x, w, offsets, src_rows, swiglu, (FP8,))
    k = x.shape[1]
    if k % 128:
        raise ValueError(f"FP8 block scaling needs K divisible by 128, got K={k}")
    want_x = (x.shape[0], k // 128)
    want_w = (w.shape[0], triton.cdiv(w.shape[1], 128), k // 128)
    for name, t, want in (("x_scales", x_scales, want_x), ("w_scales", w_scales, want_w)):
        if t.shape != want or t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be fp32 {want} with unit last stride, got {t.dtype} {tuple(t.shape)}"
            )
    if out_dtype not in (*DTYPES, torch.float32):
        raise ValueError(f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")
    return _launch(x, w, offsets, src_rows, swiglu, out_dtype, (x_scales, w_scales))


def _launch(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    src_rows: torch.Tensor | None,
    swiglu: bool,
    out_dtype: torch.dtype,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    m = src_rows.shape[0] if src_rows is not None else x.shape[0]
    n_experts, n_w, k = w.shape
    n = n_w // 2 if swiglu else n_w
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    offsets = offsets.to(torch.int32)
    gather = src_rows is not None
    rows_src = src_rows.to(torch.int32) if gather else offsets  # never read unless GATHER
    fp8 = scales is not None
    xs, ws = scales if fp8 else (offsets, offsets)  # never read unless FP8
    args = (x, w, y, offsets, rows_src, xs, ws, n_experts, n, k)
    strides = (x.stride(0), w.stride(0), w.stride(1), w.stride(2), y.stride(0))
    strides += (xs.stride(0), ws.stride(0), ws.stride(1)) if fp8 else (0, 0, 0)
    meta = dict(BLOCK_E=triton.next_power_of_2(n_experts), GROUP_M=GROUP_M)
    meta.update(GATHER=gather, SWIGLU=swiglu, FP8=fp8)

    def grid(cfg: dict) -> tuple[int]:
        # Σ_e ⌈n_e / BLOCK_M⌉ ≤ ⌈M / BLOCK_M⌉ + E, and never more tiles than rows
        tiles_m = min(triton.cdiv(m, cfg["BLOCK_M"]) + n_experts, m)
        return (tiles_m * triton.cdiv(n, cfg["BLOCK_N"]),)

    bucket = triton.next_power_of_2(m)
    if INTERPRETED:
        upcast = x.dtype == torch.bfloat16  # the interpreter multiplies bf16's raw bits
        cfg = {**_INTERPRETER_CONFIG, "BLOCK_K": 128} if fp8 else _INTERPRETER_CONFIG
        _grouped_gemm_kernel[grid(cfg)](*args, *strides, bucket, **meta, **cfg, UPCAST_DOT=upcast)
    else:
        tuned = _grouped_gemm_fp8_tuned if fp8 else _grouped_gemm_tuned
        tuned[grid](*args, *strides, bucket, **meta, UPCAST_DOT=False)
    return y


def _check_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    src_rows: torch.Tensor | None,
    swiglu: bool,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(
            f"x must be [rows, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.dtype not in dtypes or w.dtype != x.dtype:
        raise ValueError(f"x and w must share a dtype in {dtypes}, got {x.dtype} and {w.dtype}")
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but w has K={w.shape[2]}")
    if swiglu and w.shape[1] % 2:
        raise ValueError(f"swiglu needs w [E, 2I, K] (gate then up), got N={w.shape[1]}")
    if offsets.shape != (w.shape[0] + 1,) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"offsets must be an int tensor of shape [E + 1 = {w.shape[0] + 1}], got "
            f"{offsets.dtype} {tuple(offsets.shape)}"
        )
    if src_rows is not None and (
        src_rows.dim() != 1 or src_rows.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"src_rows must be a 1-D int tensor, got {src_rows.dtype} {tuple(src_rows.shape)}"
        )
    if x.stride(1) != 1 or 1 not in (w.stride(1), w.stride(2)):
        raise ValueError("x needs unit stride in K, w unit stride in K or N")
    if dtypes == (FP8,) and w.stride(2) != 1:
        raise ValueError("FP8 weights need unit stride in K (their 128×128 blocks)")
    tensors = [x, w, offsets] + ([src_rows] if src_rows is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, w, offsets and src_rows must be on one device")
    require()
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError("grouped_gemm runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")


@triton.jit
def _moe_combine_kernel(
    Y,  # [M, H] expert outputs, sorted by expert
    POS,  # [T, TOPK] int32: sorted row of the pair (token t, its j-th expert)
    WEIGHTS,  # [T, TOPK] fp32 gating weights g
    OUT,  # [T, H]
    H,
    stride_ym,
    stride_om,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOPK):
        row = tl.load(POS + token * TOPK + j).to(tl.int64)
        g = tl.load(WEIGHTS + token * TOPK + j)
        acc += g * tl.load(Y + row * stride_ym + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + token * stride_om + cols, acc.to(OUT.dtype.element_ty), mask=ok)


def moe_combine(y_sorted: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_j weights[t, j] · y_sorted[pos[t, j]] in fp32, returned in y's dtype (eq. 12).

    Args:
        y_sorted: [M, H] expert outputs in sorted order.
        pos: [T, K_r] int — where each (token, choice) pair landed in the sorted order.
        weights: [T, K_r] — gating weights g_{i,t}.
    """
    if pos.dim() != 2 or weights.shape != pos.shape:
        raise ValueError(
            f"pos and weights must both be [T, K_r], got {tuple(pos.shape)} and {tuple(weights.shape)}"
        )
    if y_sorted.dim() != 2 or y_sorted.shape[0] != pos.numel() or y_sorted.stride(1) != 1:
        raise ValueError(
            f"y_sorted must be [T·K_r = {pos.numel()}, H] with unit stride in H, got {tuple(y_sorted.shape)}"
        )
    t, topk = pos.shape
    h = y_sorted.shape[1]
    out = torch.empty(t, h, dtype=y_sorted.dtype, device=y_sorted.device)
    if out.numel() == 0:
        return out
    block = min(triton.next_power_of_2(h), 1024)
    _moe_combine_kernel[(t, triton.cdiv(h, block))](
        y_sorted,
        pos.to(torch.int32).contiguous(),
        weights.to(torch.float32).contiguous(),
        out,
        h,
        y_sorted.stride(0),
        out.stride(0),
        TOPK=topk,
        BLOCK=block,
    )
    return out


class Permutation(NamedTuple):
    """(token, choice) pairs sorted by expert: what the grouped GEMM and the combine need."""

    src_rows: torch.Tensor  # [T·K_r] int32: the token each sorted row reads
    offsets: torch.Tensor  # [E + 1] int32: expert e owns sorted rows offsets[e]:offsets[e+1]
    pos: torch.Tensor  # [T, K_r] int32: the sorted row of each (token, choice) pair


def moe_permute(indices: torch.Tensor, n_experts: int) -> Permutation:
    """Sort the router's choices [T, K_r] by expert, on the device (no host sync)."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [T, K_r], got {tuple(indices.shape)}")
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    # index_add, not bincount: bincount reads the largest id back to the host, a sync
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(n_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    src_rows = (order // indices.shape[1]).to(torch.int32)
    return Permutation(src_rows, offsets, pos.view(indices.shape).to(torch.int32))


def moe_forward(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Σ_i g_{i,t} FFN_i(x_t) over the chosen experts (eq. 12, routed part).

    Args:
        x: [T, hidden]; indices, weights: [T, K_r] from the gate;
        w_gate_up: [E, 2I, hidden] (gate rows, then up rows); w_down: [E, hidden, I].
    """
    perm = moe_permute(indices, w_gate_up.shape[0])
    h = grouped_gemm(x, w_gate_up, perm.offsets, src_rows=perm.src_rows, swiglu=True)
    y = grouped_gemm(h, w_down, perm.offsets)
    return moe_combine(y, perm.pos, weights)


@triton.jit
def _grouped_wgrad_kernel(
    DY,  # [M, N] gradients of the outputs, rows sorted by expert
    X,  # [M, K] the inputs, in the same order
    DW,  # [E, N, K]
    OFFSETS,  # [E + 1] int32
    N,
    K,
    stride_dym,
    stride_xm,
    stride_dwe,
    rows_bucket,  # the autotuning key only
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """dW[e] = DY[rows of e]ᵀ · X[rows of e]: one program per (expert, N-tile, K-tile), looping
    over that expert's rows. An expert without rows writes zeros, its true gradient."""
    expert = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    cols_n = (tl.program_id(1) // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = (tl.program_id(1) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = cols_n < N, cols_k < K
    start = tl.load(OFFSETS + expert)
    end = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        dy = tl.load(
            DY + rows.to(tl.int64)[:, None] * stride_dym + cols_n[None, :],
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        x = tl.load(
            X + rows.to(tl.int64)[:, None] * stride_xm + cols_k[None, :],
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc)
    dw_ptrs = DW + expert.to(tl.int64) * stride_dwe + cols_n[:, None] * K + cols_k[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


_grouped_wgrad_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for m, n, k, w, st in [
            (64, 128, 128, 8, 3),
            (32, 128, 128, 4, 4),
            (64, 64, 128, 4, 4),
            (32, 64, 64, 4, 4),
        ]
    ],
    key=["N", "K", "rows_bucket"],
)(_grouped_wgrad_kernel)


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``grouped_gemm`` (rows pre-sorted): dW[e] = dy_eᵀ · x_e for the
    rows offsets[e]:offsets[e+1], [E, N, K] in x's dtype, accumulated in fp32.

    Unlike the forward, the reduction runs over the *grouped* dimension (tokens), so each
    program owns an output tile of one expert and walks that expert's rows.
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"dy [M, N] and x [M, K] must share M, got {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    if dy.dtype not in DTYPES or x.dtype != dy.dtype:
        raise ValueError(f"dy and x must share a dtype in {DTYPES}, got {dy.dtype} and {x.dtype}")
    require()
    dy, x = dy.contiguous(), x.contiguous()
    n_experts, (m, n), k = offsets.shape[0] - 1, dy.shape, x.shape[1]
    dw = torch.empty(n_experts, n, k, dtype=x.dtype, device=x.device)
    offsets = offsets.to(torch.int32)
    args = (dy, x, dw, offsets, n, k, dy.stride(0), x.stride(0), dw.stride(0))
    bucket = triton.next_power_of_2(max(m, 1))
    if INTERPRETED:
        cfg = _INTERPRETER_CONFIG
        grid = (n_experts, triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]))
        upcast = x.dtype == torch.bfloat16
        _grouped_wgrad_kernel[grid](*args, bucket, **cfg, UPCAST_DOT=upcast)
    else:

        def grid(cfg: dict) -> tuple[int, int]:
            return (n_experts, triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(k, cfg["BLOCK_K"]))

        _grouped_wgrad_tuned[grid](*args, bucket, UPCAST_DOT=False)
    return dw


class _SwiGLUExperts(torch.autograd.Function):
    """y = down(silu(x·W_gateᵀ) · (x·W_upᵀ)) per expert on rows sorted by expert.

    Forward: the fused SwiGLU GEMM (gate and up never reach memory) and the down GEMM; only
    h = silu(g)·u is kept. Backward recomputes g and u with one more grouped GEMM (cheaper in
    memory than keeping them, [M, 2I]), then four grouped GEMMs: dX and dW of each projection.
    """

    @staticmethod
    def forward(ctx, x, offsets, w_gate_up, w_down):
        h = grouped_gemm(x, w_gate_up, offsets, swiglu=True)
        ctx.save_for_backward(x, offsets, w_gate_up, w_down, h)
        return grouped_gemm(h, w_down, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, offsets, w_gate_up, w_down, h = ctx.saved_tensors
        dy = dy.contiguous()
        gate, up = grouped_gemm(x, w_gate_up, offsets).float().chunk(2, dim=-1)
        dh = grouped_gemm(dy, w_down.transpose(1, 2), offsets).float()  # dy · W_down
        sig = torch.sigmoid(gate)  # silu'(g) = σ(g) (1 + g (1 − σ(g)))
        d_gate = dh * up * sig * (1 + gate * (1 - sig))
        d_gate_up = torch.cat([d_gate, dh * gate * sig], dim=-1).to(x.dtype)
        dx = grouped_gemm(d_gate_up, w_gate_up.transpose(1, 2), offsets)  # · W_gate_up
        return dx, None, grouped_wgrad(d_gate_up, x, offsets), grouped_wgrad(dy, h, offsets)


def moe_experts(
    x: torch.Tensor, offsets: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Every expert's SwiGLU FFN on its rows, differentiable in x and both weight stacks.

    Args:
        x: [M, hidden] bf16/fp16, rows sorted by expert (expert e owns offsets[e]:offsets[e+1]).
        offsets: [E + 1] int, from 0 to M.
        w_gate_up: [E, 2I, hidden] (gate rows, then up rows); w_down: [E, hidden, I].
    """
    return _SwiGLUExperts.apply(x, offsets, w_gate_up, w_down)


def grouped_gemm_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    *,
    src_rows: torch.Tensor | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """The same product in fp32 as a loop of torch matmuls, one per expert (each expert's
    weight upcast in turn, so the reference never holds an fp32 copy of all of them)."""
    xs = x[src_rows.long()] if src_rows is not None else x
    n = w.shape[1] // 2 if swiglu else w.shape[1]
    y = torch.empty(xs.shape[0], n, dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out = xs[lo:hi].float() @ w[e].float().t()
            if swiglu:
                gate, up = out.split(n, dim=-1)
                out = torch.nn.functional.silu(gate) * up
            y[lo:hi] = out
    return y
