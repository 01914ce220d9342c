"""MLA decode over the latent cache: a split-KV Triton kernel, a combine pass, a torch reference.

With W^UK folded into the query and W^UV applied after attention (report §2.1.1, the absorbed
path of ``dsv3lite/model/mla.py``), one decode step of every head attends to the same two
cached tensors per token, c^KV (``kv_lora_rank`` = 512 wide) and k^R (``qk_rope_head_dim`` = 64):

    s_{h,j} = (q^C_h W^UK_h · c^KV_j + q^R_h · k^R_j) · scale          (eqs. 2, 4, 10 folded)
    o_h     = Σ_j softmax_j(s_{h,j}) c^KV_j                             (eq. 10, before W^UV)

so the cache is a single "key" of 576 values that is also its own 512-wide "value", shared by
all heads — multi-query attention with a very wide head. That decides the design:

* **Many heads per program.** Each program takes ``BLOCK_H`` query rows (heads, and with MTP
  verification also the 2 tokens of a sequence) and a tile of ``BLOCK_N`` cached tokens, and
  runs two ``tl.dot``: [BLOCK_H, 576] × [576, BLOCK_N] for the scores and [BLOCK_H, BLOCK_N] ×
  [BLOCK_N, 512] for the output. The cache tile is loaded once and used by every row in the
  block, for both products. With 128 heads a step does ~2,200 FLOPs per cached token per head
  — ~240 FLOPs per byte, above the H200's ~185 — so it is compute-bound and the tile must be
  reused across as many heads as registers allow (64 rows × 512 fp32 accumulators is 128
  registers per thread over 8 warps). With 16 heads it is memory-bound: one block holds all
  heads and the cache is read exactly once.
* **Split-KV.** A batch of 4 sequences at 128 heads is only 8 programs; the H200 has 132 SMs.
  So the sequence is cut into ``num_splits`` chunks handled by separate programs, each writing
  its normalised partial output and the log-sum-exp of its scores (fp32), and a second, cheap
  kernel combines them: o = Σ_s e^{lse_s − lse} o_s with lse = log Σ_s e^{lse_s}. The number of
  splits is chosen so that batch × head blocks × splits is about one wave of SMs, while every
  split still reads enough tokens that its partial output (fp32, rows × 512) stays small next
  to the cache it read. With one split the kernel writes the final output directly.
* **Online softmax in fp32, in base 2**: scores are scaled by ``scale · log2 e`` and ``exp2`` is
  used throughout (the lse of the partials is in the same base, only the combine reads it).
* **Per-sequence lengths and causality inside the step.** Sequence b attends to its first
  ``cache_seqlens[b]`` positions; when T > 1 query tokens are verified at once (MTP, §5.4.3),
  they are the last T cached positions and token t sees positions ≤ seqlen − T + t.
* **Paged cache** (optional): ``kv_cache`` [pages, page_size, 512] with ``block_table`` [B,
  max_pages]; the kernel looks up the page of every key of a tile, so a tile may straddle pages
  and the page size is a runtime value.

What Triton costs here: when one dot's result feeds another (S → P → P·V), Triton 3.6 lays all
warps of the first dot along its rows. With 64 rows and 8 warps both warpgroups then compute
the same 64 × BLOCK_N scores — about 1.5× the useful tensor-core work at 128 heads (checked in
the sm_90 PTX: 72 m64n16k16 score instructions per warpgroup per 32-key tile). FlashMLA avoids
it with warp specialisation (one warpgroup computes the scores and shares P through shared
memory); Triton's Gluon dialect could express that, and is the next step.

Memory safety: keys beyond a sequence's length are never read (masked loads), because a
pre-allocated cache holds uninitialised memory there, and 0 × NaN would poison the output.
``mla_decode_reference`` below is the same computation in plain torch; the tests check the
kernel against it (through the Triton interpreter on CPU), and ``python -m dsv3lite bench mla``
times both on a GPU.
"""

from __future__ import annotations

import math

import torch

from ._triton import INTERPRETED, require, tl, triton

CACHE_DTYPES = (torch.bfloat16, torch.float16)
# A split reads at least this many tokens (1,152 bytes each at 512 + 64 in bf16). Its fp32
# partial output, rows × 512 × 4 bytes, is then ~1/9 of that for a 16-row block (memory-bound
# heads) and ~0.45 for a 64-row block — where the step is compute-bound and busy SMs matter more.
MIN_SPLIT_TOKENS = 256
# Rows of a nominal head block when choosing the number of splits (the tuned BLOCK_H may differ).
NOMINAL_BLOCK_H = 64


@triton.jit
def _mla_decode_split_kernel(
    Q,  # [B, T, H, D_C]
    QPE,  # [B, T, H, D_R]
    KV,  # [B, L, D_C] or [pages, page_size, D_C]
    KPE,  # [B, L, D_R] or [pages, page_size, D_R]
    BLOCK_TABLE,  # [B, max_pages] int32 (only read when IS_PAGED)
    SEQLENS,  # [B] int32
    OUT,  # [B, S, T, H, D_C]: partials (fp32) when S > 1, else the output itself
    LSE,  # [B, S, T, H] fp32 (only written when SPLIT)
    stride_qb,
    stride_qt,
    stride_qh,
    stride_pb,
    stride_pt,
    stride_ph,
    stride_kvb,
    stride_kvn,
    stride_peb,
    stride_pen,
    stride_btb,
    stride_ob,
    stride_os,
    stride_ot,
    stride_oh,
    stride_lb,
    stride_ls,
    stride_lt,
    n_heads,
    n_tokens,  # T, the query tokens per sequence
    capacity,  # positions the cache can hold per sequence
    page_size,
    num_splits,
    qk_scale,  # softmax scale × log2(e)
    D_C: tl.constexpr,
    D_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_PAGED: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_h = tl.program_id(0)  # head blocks vary fastest: they share this chunk of cache in L2
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)

    seqlen = tl.minimum(tl.load(SEQLENS + pid_b), capacity)
    # Chunks are whole tiles, sized per sequence, so no split of a short sequence is ragged.
    chunk = tl.cdiv(tl.cdiv(seqlen, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seqlen)

    # Query rows r = t·H + h: the heads of one token, then the next token (MTP verification).
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < n_tokens * n_heads
    t = rows // n_heads
    h = rows % n_heads
    # Keys this row may see in this chunk: before `end`, and causally before its own position.
    limit = tl.minimum(end, seqlen - n_tokens + t + 1)

    offs_c = tl.arange(0, D_C)
    offs_r = tl.arange(0, D_R)
    q_rows = pid_b * stride_qb + t * stride_qt + h * stride_qh
    q = tl.load(Q + q_rows[:, None] + offs_c[None, :], mask=row_ok[:, None], other=0.0)
    p_rows = pid_b * stride_pb + t * stride_pt + h * stride_ph
    q_pe = tl.load(QPE + p_rows[:, None] + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if IS_PAGED:
            page = tl.load(
                BLOCK_TABLE + pid_b * stride_btb + offs_n // page_size, mask=n_ok, other=0
            ).to(tl.int64)
            kv_rows = page * stride_kvb + (offs_n % page_size) * stride_kvn
            pe_rows = page * stride_peb + (offs_n % page_size) * stride_pen
        else:
            kv_rows = pid_b.to(tl.int64) * stride_kvb + offs_n * stride_kvn
            pe_rows = pid_b.to(tl.int64) * stride_peb + offs_n * stride_pen
        kv = tl.load(KV + kv_rows[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0.0)
        k_pe = tl.load(KPE + pe_rows[:, None] + offs_r[None, :], mask=n_ok[:, None], other=0.0)
        if UPCAST_DOT:
            kv = kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)

        s = tl.dot(q_pe, tl.trans(k_pe))
        s = tl.dot(q, tl.trans(kv), s) * qk_scale
        s = tl.where(offs_n[None, :] < limit[:, None], s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row can see no key of a tile (causal MTP rows at a chunk edge): keep it finite.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None])
        m = m_new

    seen = l_sum > 0.0
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    o_rows = pid_b * stride_ob + pid_s * stride_os + t * stride_ot + h * stride_oh
    tl.store(
        OUT + o_rows[:, None] + offs_c[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None]
    )
    if SPLIT:
        lse = tl.where(seen, m + tl.log2(tl.where(seen, l_sum, 1.0)), float("-inf"))
        l_rows = pid_b * stride_lb + pid_s * stride_ls + t * stride_lt + h
        tl.store(LSE + l_rows, lse, mask=row_ok)


@triton.jit
def _mla_decode_combine_kernel(
    O_PART,  # [B, S, T, H, D_C] fp32
    LSE,  # [B, S, T, H] fp32, base 2
    OUT,  # [B, T, H, D_C]
    stride_pb,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_lb,
    stride_ls,
    stride_lt,
    stride_ob,
    stride_ot,
    stride_oh,
    n_heads,
    num_splits,
    D_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    """One program per (row, batch element, slice of D_C): o = Σ_s 2^{lse_s − max} o_s / Σ_s …"""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_d = tl.program_id(2)
    t = pid_r // n_heads
    h = pid_r % n_heads

    offs_all = tl.arange(0, MAX_SPLITS)
    lse_row = LSE + pid_b * stride_lb + t * stride_lt + h
    lse_all = tl.load(
        lse_row + offs_all * stride_ls, mask=offs_all < num_splits, other=float("-inf")
    )
    lse_max = tl.max(lse_all, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    base = O_PART + pid_b * stride_pb + t * stride_pt + h * stride_ph
    acc = tl.zeros([BLOCK_D], tl.float32)
    weight = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < num_splits
        w = tl.exp2(tl.load(lse_row + offs_s * stride_ls, mask=s_ok, other=float("-inf")) - lse_max)
        part = tl.load(
            base + offs_s[:, None] * stride_ps + offs_d[None, :],
            mask=(w > 0.0)[:, None] & (offs_d < D_C)[None, :],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * part, axis=0)
        weight += w
    total = tl.sum(weight, axis=0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    o_ptr = OUT + pid_b * stride_ob + t * stride_ot + h * stride_oh + offs_d
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=offs_d < D_C)


def _split_configs() -> list[triton.Config]:
    """Tiles for the H200: 64 rows × 512 fp32 accumulators need 8 warps (128 registers each);
    16-row blocks are for 16 heads, where bytes in flight matter more than reuse."""
    shapes = [
        (64, 32, 8, 2),
        (64, 32, 8, 3),
        (64, 64, 8, 2),
        (32, 64, 8, 2),
        (16, 32, 4, 3),
        (16, 64, 4, 2),
        (16, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bh, bn, w, s in shapes
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop row blocks larger than the rows there are (16 at least: tl.dot's minimum)."""
    rows = named_args["n_heads"] * named_args["n_tokens"]
    biggest = max(16, triton.next_power_of_2(rows))
    return [c for c in configs if c.kwargs["BLOCK_H"] <= biggest]


_mla_decode_split_tuned = triton.autotune(
    configs=_split_configs(),
    key=["n_heads", "n_tokens", "num_splits", "D_C", "D_R", "IS_PAGED"],
    prune_configs_by={"early_config_prune": _prune},
)(_mla_decode_split_kernel)

# The interpreter runs one fixed tile: 32 keys, so that short test contexts span several tiles.
_INTERPRETER_CONFIG = {"BLOCK_H": 16, "BLOCK_N": 32}


def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    k_pe_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    *,
    block_table: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One absorbed-MLA decode step over the latent cache.

    Args:
        q_latent: [B, H, D_C] or [B, T, H, D_C] — q^C with W^UK folded in; T query tokens per
            sequence (T = 2 verifies an MTP draft), the last T cached positions.
        q_pe: [B, H, D_R] or [B, T, H, D_R] — the rotated q^R.
        kv_cache: [B, L, D_C] c^KV, or [pages, page_size, D_C] with ``block_table``.
        k_pe_cache: [B, L, D_R] k^R, or [pages, page_size, D_R]; bf16 or fp16 like kv_cache.
        cache_seqlens: [B] int — positions of sequence b that are filled (its new tokens
            included); T ≤ cache_seqlens[b] ≤ L (or max_pages · page_size).
        softmax_scale: multiplies the scores (with YaRN, the model's mscale² is in it).
        block_table: [B, max_pages] int — page ids of each sequence, in order (paged layout).
        max_seqlen: an upper bound of cache_seqlens known to the caller. Given, no host sync
            happens (the decode loop knows its length) and cache_seqlens is trusted; None
            reads cache_seqlens back and validates it (one sync).
        num_splits: chunks of the sequence handled by separate programs; None picks one from
            the batch, the heads and the number of SMs.

    Returns:
        [B, (T,) H, D_C] in the cache dtype: Σ_j p_j c^KV_j (W^UV is applied by the caller).
    """
    squeeze = q_latent.dim() == 3
    if kv_cache.dtype not in CACHE_DTYPES or k_pe_cache.dtype != kv_cache.dtype:
        raise ValueError(
            f"kv_cache and k_pe_cache must share a dtype in {CACHE_DTYPES}, got "
            f"{kv_cache.dtype} and {k_pe_cache.dtype}"
        )
    q_latent, q_pe = _check_queries(q_latent, q_pe, kv_cache.dtype)
    b, t, h, d_c = q_latent.shape
    d_r = q_pe.shape[-1]
    _check_cache(kv_cache, k_pe_cache, d_c, d_r, q_latent.device)
    paged = block_table is not None
    if paged:
        block_table = _check_block_table(block_table, b, q_latent.device)
        page_size = kv_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        if kv_cache.shape[0] != b:
            raise ValueError(
                f"kv_cache holds {kv_cache.shape[0]} sequences but the queries have batch {b} "
                "(pass block_table for a paged cache)"
            )
        page_size = capacity = kv_cache.shape[1]
    seqlens = _check_seqlens(cache_seqlens, b, q_latent.device)
    out = torch.empty(b, t, h, d_c, dtype=kv_cache.dtype, device=q_latent.device)
    if b == 0:
        return out[:, 0] if squeeze else out
    if max_seqlen is None:
        max_seqlen = _validate_lengths(seqlens, t, capacity, block_table, kv_cache.shape[0])
    elif not t <= max_seqlen <= capacity:
        raise ValueError(f"max_seqlen must lie in [T={t}, capacity={capacity}], got {max_seqlen}")

    if num_splits is None:
        splits = choose_num_splits(b, t * h, max_seqlen, q_latent.device)
    else:
        splits = num_splits
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    split = splits > 1
    if split:
        o_part = torch.empty(b, splits, t, h, d_c, dtype=torch.float32, device=out.device)
        lse = torch.empty(b, splits, t, h, dtype=torch.float32, device=out.device)
    else:
        o_part, lse = out.unsqueeze(1), out.new_empty(0, 0, 0, 0, dtype=torch.float32)

    table = block_table if paged else seqlens  # any int tensor: never read unless paged
    args = (
        q_latent,
        q_pe,
        kv_cache,
        k_pe_cache,
        table,
        seqlens,
        o_part,
        lse,
        *q_latent.stride()[:3],
        *q_pe.stride()[:3],
        kv_cache.stride(0),
        kv_cache.stride(1),
        k_pe_cache.stride(0),
        k_pe_cache.stride(1),
        table.stride(0),
        *o_part.stride()[:4],
        *(lse.stride()[:3] if split else (0, 0, 0)),
    )
    rows = t * h
    qk_scale = softmax_scale * math.log2(math.e)
    meta = dict(D_C=d_c, D_R=d_r, IS_PAGED=paged, SPLIT=split)
    if INTERPRETED:
        grid = (triton.cdiv(rows, _INTERPRETER_CONFIG["BLOCK_H"]), splits, b)
        upcast = kv_cache.dtype == torch.bfloat16  # the interpreter multiplies bf16's raw bits
        _mla_decode_split_kernel[grid](
            *args, h, t, capacity, page_size, splits, qk_scale, **meta,
            **_INTERPRETER_CONFIG, UPCAST_DOT=upcast,
        )  # fmt: skip
    else:

        def grid(cfg: dict) -> tuple[int, int, int]:
            return (triton.cdiv(rows, cfg["BLOCK_H"]), splits, b)

        _mla_decode_split_tuned[grid](
            *args, h, t, capacity, page_size, splits, qk_scale, **meta, UPCAST_DOT=False
        )
    if split:
        block_d = d_c if INTERPRETED else min(d_c, 128)  # fewer programs to interpret
        _mla_decode_combine_kernel[(rows, b, triton.cdiv(d_c, block_d))](
            o_part,
            lse,
            out,
            *o_part.stride()[:4],
            *lse.stride()[:3],
            *out.stride()[:3],
            h,
            splits,
            D_C=d_c,
            BLOCK_D=block_d,
            BLOCK_S=16,
            MAX_SPLITS=triton.next_power_of_2(splits),
        )
    return out[:, 0] if squeeze else out


def choose_num_splits(batch: int, rows: int, max_seqlen: int, device: torch.device) -> int:
    """About one wave of programs (batch × head blocks × splits ≈ programs the SMs hold at
    once), each split reading at least MIN_SPLIT_TOKENS tokens; one split when the batch alone
    fills the GPU. Blocks of ≤ 32 rows are small enough for two programs per SM."""
    if device.type != "cuda":
        return 1
    slots = torch.cuda.get_device_properties(device).multi_processor_count
    slots *= 2 if rows <= 32 else 1
    programs = batch * triton.cdiv(rows, NOMINAL_BLOCK_H)
    return max(1, min(slots // programs, triton.cdiv(max_seqlen, MIN_SPLIT_TOKENS)))


def _check_queries(
    q_latent: torch.Tensor, q_pe: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, (T,) H, D] → [B, T, H, D] with unit stride in D; dims must suit tl.dot."""
    if q_latent.dim() not in (3, 4) or q_pe.dim() != q_latent.dim():
        raise ValueError(
            "q_latent and q_pe must both be [B, H, D] or [B, T, H, D], got "
            f"{tuple(q_latent.shape)} and {tuple(q_pe.shape)}"
        )
    if q_latent.dim() == 3:
        q_latent, q_pe = q_latent[:, None], q_pe[:, None]
    if q_latent.shape[:3] != q_pe.shape[:3]:
        raise ValueError(
            f"q_latent {tuple(q_latent.shape)} and q_pe {tuple(q_pe.shape)} disagree on "
            "batch, tokens or heads"
        )
    if q_latent.dtype != dtype or q_pe.dtype != dtype:
        raise ValueError(
            f"queries must have the cache dtype {dtype}, got {q_latent.dtype} and {q_pe.dtype}"
        )
    for name, d in (("kv_lora_rank", q_latent.shape[-1]), ("qk_rope_head_dim", q_pe.shape[-1])):
        if d < 16 or d & (d - 1):
            raise ValueError(f"{name} must be a power of two >= 16 for this kernel, got {d}")
    return _unit_last_stride(q_latent), _unit_last_stride(q_pe)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(
    kv_cache: torch.Tensor, k_pe_cache: torch.Tensor, d_c: int, d_r: int, device: torch.device
) -> None:
    if kv_cache.dim() != 3 or k_pe_cache.dim() != 3:
        raise ValueError(
            "kv_cache and k_pe_cache must be [B, L, D] (or [pages, page_size, D]), got "
            f"{tuple(kv_cache.shape)} and {tuple(k_pe_cache.shape)}"
        )
    if (
        kv_cache.shape[-1] != d_c
        or k_pe_cache.shape[-1] != d_r
        or kv_cache.shape[:2] != k_pe_cache.shape[:2]
    ):
        raise ValueError(
            f"cache shapes {tuple(kv_cache.shape)} and {tuple(k_pe_cache.shape)} do not match "
            f"the queries' kv_lora_rank {d_c} and qk_rope_head_dim {d_r}"
        )
    if kv_cache.stride(-1) != 1 or k_pe_cache.stride(-1) != 1:
        raise ValueError("kv_cache and k_pe_cache need unit stride in their last dimension")
    if kv_cache.device != device or k_pe_cache.device != device:
        raise ValueError(f"caches are on {kv_cache.device}, queries on {device}")
    require()
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError("mla_decode runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")


def _check_block_table(block_table: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [B={b}, max_pages], got {tuple(block_table.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64) or block_table.device != device:
        raise ValueError(f"block_table must be an int tensor on {device}")
    return block_table.to(torch.int32)


def _check_seqlens(cache_seqlens: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cache_seqlens must be an int tensor of shape [B={b}], got "
            f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}"
        )
    return cache_seqlens.to(device=device, dtype=torch.int32)


def _validate_lengths(
    seqlens: torch.Tensor, t: int, capacity: int, block_table: torch.Tensor | None, pages: int
) -> int:
    """One host sync: T ≤ cache_seqlens ≤ capacity, and every used page id exists."""
    checks = [seqlens.min(), seqlens.max()]
    if block_table is not None and block_table.numel():
        page_size = capacity // block_table.shape[1]
        used = (
            torch.arange(block_table.shape[1], device=seqlens.device)
            < ((seqlens + page_size - 1) // page_size)[:, None]
        )
        bad = used & ((block_table < 0) | (block_table >= pages))
        checks.append(bad.any().to(torch.int32))
    lo, hi, *bad_pages = torch.stack(checks).tolist()
    if lo < t or hi > capacity:
        raise ValueError(
            f"cache_seqlens must lie in [T={t}, capacity={capacity}] (the new tokens are "
            f"cached; positions beyond the cache do not exist), got [{lo}, {hi}]"
        )
    if bad_pages and bad_pages[0]:
        raise ValueError(f"block_table refers to pages outside the cache's {pages} pages")
    return hi


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    k_pe_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    *,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same step in plain torch: einsums in the inputs' dtype, softmax in fp32, masks for
    the lengths and for causality between the T query tokens. Called with fp32 inputs it is
    the reference the kernel is tested against."""
    squeeze = q_latent.dim() == 3
    if squeeze:
        q_latent, q_pe = q_latent[:, None], q_pe[:, None]
    t = q_latent.shape[1]
    kv, k_pe = kv_cache, k_pe_cache
    if block_table is not None:  # gather each sequence's pages into one contiguous run
        kv = kv_cache[block_table.long()].flatten(1, 2)
        k_pe = k_pe_cache[block_table.long()].flatten(1, 2)
    seqlens = cache_seqlens.to(kv.device)
    length = int(seqlens.max())
    positions = torch.arange(length, device=kv.device)
    # a cache holds garbage (even NaN) past each length: zero it, as 0 · NaN would poison
    filled = (positions < seqlens[:, None])[..., None]
    kv = kv[:, :length].masked_fill(~filled, 0.0)
    k_pe = k_pe[:, :length].masked_fill(~filled, 0.0)
    scores = torch.einsum("bthc,blc->bthl", q_latent, kv)
    scores = (scores + torch.einsum("bthr,blr->bthl", q_pe, k_pe)).float() * softmax_scale
    last = seqlens[:, None] - t + torch.arange(t, device=kv.device)  # [B, T]: last key seen
    visible = positions <= last[:, :, None]  # [B, T, L]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(kv.dtype)
    out = torch.einsum("bthl,blc->bthc", probs, kv)
    return out[:, 0] if squeeze else out
