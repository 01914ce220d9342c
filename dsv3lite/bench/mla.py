"""``bench mla``: one absorbed-MLA decode step, the Triton kernel (``kernels/mla_decode.py``)
against the eager torch einsums that ``MLA._absorbed`` runs, at 16 and 128 heads.

Each row reports the latent cache bandwidth it reaches (B·L·576·2 bytes read, over the time)
against a device-to-device copy, and its TFLOP/s (≈ 2·B·L·H·(576 + 512)) against an 8192³ bf16
GEMM, both measured in the same run: at 128 heads a step is compute-bound (judge it by the
GEMM), at 16 heads memory-bound (judge it by the copy). Without CUDA a tiny smoke version runs
on the CPU; the kernel runs there only under ``TRITON_INTERPRET=1``, and its time then measures
the interpreter.
"""

from __future__ import annotations

import torch

from ..accounting import absorbed_decode_cost
from .harness import Results, Row, measure_ceilings
from .kernel_rows import Work, kernels_runnable, skipped, timed

LATENT, ROPE = 512, 64  # DeepSeek-V3's kv_lora_rank and qk_rope_head_dim
GPU_SHAPES = [(64, 4096), (128, 8192), (4, 32768), (1, 32768)]  # (batch, context)
CPU_SHAPES = [(2, 100)]
HEADS = (16, 128)


def run(device: torch.device, quick: bool) -> Results:
    """Eager torch, then ours, on every (heads, batch, context)."""
    on_gpu = device.type == "cuda"
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    heads = HEADS if on_gpu or not quick else (16,)
    if on_gpu and quick:
        shapes = [(64, 4096), (1, 32768)]
    res = Results(ceilings=measure_ceilings(device, quick))
    gen = torch.Generator(device=device).manual_seed(0)
    for h in heads:
        for b, length in shapes:
            res.rows += _rows(h, b, length, gen, res.ceilings, quick)
            shape = f"H{h} B{b} L{length}"
            res.ratio(f"ours / eager {shape}", f"ours triton {shape}", f"eager torch {shape}")
    return res


def _rows(
    h: int, b: int, length: int, gen: torch.Generator, ceilings: dict, quick: bool
) -> list[Row]:
    """Eager torch, then ours, on one shape: full caches, one new token per sequence."""
    from ..kernels.mla_decode import mla_decode, mla_decode_reference

    device = gen.device
    dt = torch.bfloat16
    q = torch.randn(b, 1, h, LATENT, generator=gen, device=device, dtype=dt)
    q_pe = torch.randn(b, 1, h, ROPE, generator=gen, device=device, dtype=dt)
    kv = torch.randn(b, length, LATENT, generator=gen, device=device, dtype=dt)
    k_pe = torch.randn(b, length, ROPE, generator=gen, device=device, dtype=dt)
    seqlens = torch.full((b,), length, dtype=torch.int32, device=device)
    scale = (128 + ROPE) ** -0.5  # qk_head_dim of V3: 128 nope + 64 rope

    def eager() -> torch.Tensor:
        return eager_absorbed_decode(q, q_pe, kv, k_pe, scale)

    def ours() -> torch.Tensor:
        return mla_decode(q, q_pe, kv, k_pe, seqlens, scale, max_seqlen=length)

    n = min(b, 2)  # an fp32 reference on 2 sequences: enough to judge, small enough to fit
    ref = mla_decode_reference(
        q[:n].float(), q_pe[:n].float(), kv[:n].float(), k_pe[:n].float(), seqlens[:n], scale
    )
    shape = f"H{h} B{b} L{length}"
    nbytes, flops = absorbed_decode_cost(LATENT, ROPE, h, length, b, 1, kv.element_size())
    work = Work(bytes_read=nbytes, flops=flops)
    first_n = lambda out: out[:n]  # noqa: E731
    rows = [
        timed(shape, "eager torch", eager, first_n, ref, work, ceilings, quick,
              "MLA._absorbed's einsums in bf16"),
    ]  # fmt: skip
    if not kernels_runnable(device):
        return rows + [skipped(shape, "ours triton", "needs CUDA or TRITON_INTERPRET=1")]
    row = timed(shape, "ours triton", ours, first_n, ref, work, ceilings, quick,
                "split-KV, autotuned")  # fmt: skip
    if device.type == "cuda":
        row.note += f"; {_config_note(b, h, length, device)}"
    return rows + [row]


def eager_absorbed_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The baseline: what ``MLA._absorbed`` runs per step when every sequence fills the cache —
    ``mla_decode_reference`` without its length mask (and the host syncs the mask needs)."""
    scores = torch.einsum("bshc,btc->bsht", q_latent, kv)
    scores = (scores + torch.einsum("bshr,btr->bsht", q_pe, k_pe)).float() * scale
    probs = torch.softmax(scores, dim=-1).to(kv.dtype)
    return torch.einsum("bsht,btc->bshc", probs, kv)


def _config_note(b: int, h: int, length: int, device: torch.device) -> str:
    """The split count and the tile the autotuner picked (notebook 09 reads them back)."""
    from ..kernels.mla_decode import _mla_decode_split_tuned, choose_num_splits

    cfg = _mla_decode_split_tuned.best_config
    splits = choose_num_splits(b, h, length, device)
    return (
        f"splits {splits}, BLOCK_H {cfg.kwargs['BLOCK_H']} BLOCK_N {cfg.kwargs['BLOCK_N']} "
        f"w{cfg.num_warps} s{cfg.num_stages}"
    )
