"""``bench moe``: the routed experts' GEMM (``kernels/grouped_gemm.py``), in bf16 and in FP8
with the report's 1×128 / 128×128 scales, against ``torch._grouped_mm`` and a loop of one
matmul per expert.

Shapes: 32 experts over 65,536 rows (top-k already expanded, uneven random sizes, one expert
empty) at 7168→2048, the fused SwiGLU gate/up GEMM at 7168→2·2048, and a decode regime of 256
experts with a few rows each, which is bound by reading the weights (GB/s there counts the
weights of the experts that received rows, read once). Every candidate is checked against a
reference first; inputs are random, never zeros. Without CUDA a tiny smoke version runs on the
CPU; the kernels run there only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fp8 import act_dequant, act_quant, weight_dequant, weight_quant
from ..testing import rel_err
from .harness import Results, Row, measure_ceilings
from .kernel_rows import Work, kernels_runnable, skipped, timed


@dataclass(frozen=True)
class MoeShape:
    name: str
    experts: int
    rows: int
    k: int  # hidden
    n: int  # output columns (per half with swiglu)
    swiglu: bool = False


GPU_SHAPES = [
    MoeShape("prefill 7168→2048", 32, 65536, 7168, 2048),
    MoeShape("prefill gate_up+SwiGLU", 32, 65536, 7168, 2048, swiglu=True),
    MoeShape("decode 7168→2048", 256, 2048, 7168, 2048),
]
GPU_QUICK = [MoeShape("prefill 7168→2048", 32, 8192, 7168, 2048)]
CPU_SHAPES = [
    MoeShape("smoke", 4, 37, 128, 48),
    MoeShape("smoke SwiGLU", 4, 37, 128, 48, swiglu=True),
]
BASELINES = ("loop torch.mm", "torch._grouped_mm")


def expert_offsets(experts: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Uneven random expert sizes summing to ``rows`` (expert 1 gets none): [E + 1] int32."""
    probs = torch.rand(experts, generator=generator) + 0.2
    probs[1 % experts] = 0.0 if experts > 1 else 1.0
    picks = torch.multinomial(probs, rows, replacement=True, generator=generator)
    counts = torch.bincount(picks, minlength=experts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)


def run(device: torch.device, quick: bool) -> Results:
    """The baselines and ours on every shape; ratios against the faster baseline."""
    on_gpu = device.type == "cuda"
    shapes = (GPU_QUICK if quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    res = Results(ceilings=measure_ceilings(device, quick))
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    for s in shapes:
        rows = _rows(s, gen, cpu_gen, res.ceilings, quick)
        res.rows += rows
        timed_baselines = [r for r in rows if r.extra["impl"] in BASELINES and r.median_ms]
        if timed_baselines:
            best = min(timed_baselines, key=lambda r: r.median_ms)
            for ours in ("ours triton", "ours triton fp8"):
                name = f"{ours} {rows[0].shape}"
                res.ratio(f"{ours} / {best.extra['impl']} {s.name}", name, best.name)
    return res


def _rows(
    s: MoeShape, gen: torch.Generator, cpu_gen: torch.Generator, ceilings: dict, quick: bool
) -> list[Row]:
    """The per-expert loop, torch._grouped_mm, ours in bf16, ours in FP8, on one shape. Each is
    checked against an fp32 reference first: of its own operands (the FP8 ones dequantized)."""
    from ..kernels import grouped_gemm as gg

    device = gen.device
    dt = torch.bfloat16
    offsets_cpu = expert_offsets(s.experts, s.rows, cpu_gen)
    bounds = offsets_cpu.tolist()
    offsets = offsets_cpu.to(device)
    n_w = 2 * s.n if s.swiglu else s.n
    x = torch.randn(s.rows, s.k, generator=gen, device=device, dtype=dt)
    w = torch.randn(s.experts, n_w, s.k, generator=gen, device=device, dtype=dt) / s.k**0.5

    def loop() -> torch.Tensor:
        y = x.new_empty(s.rows, n_w)
        for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                torch.mm(x[lo:hi], w[e].t(), out=y[lo:hi])
        return _swiglu(y) if s.swiglu else y

    def grouped_mm() -> torch.Tensor:
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets[1:])
        return _swiglu(y) if s.swiglu else y

    ref = gg.grouped_gemm_reference(x, w, offsets, swiglu=s.swiglu)
    used = sum(hi > lo for lo, hi in zip(bounds[:-1], bounds[1:]))
    work = Work(bytes_read=used * n_w * s.k * w.element_size(), flops=2 * s.rows * s.k * n_w)
    shape = f"{s.name}: E{s.experts} M{s.rows} {s.k}→{n_w}"
    same = lambda y: y  # noqa: E731
    rows = []
    for name, fn in zip(BASELINES, (loop, grouped_mm)):
        try:
            rows.append(timed(shape, name, fn, same, ref, work, ceilings, quick))
        except (RuntimeError, NotImplementedError) as exc:  # e.g. _grouped_mm on an old CPU
            rows.append(skipped(shape, name, f"{type(exc).__name__}: {exc}"[:120]))
    if not kernels_runnable(device):
        why = "needs CUDA or TRITON_INTERPRET=1"
        return rows + [skipped(shape, n, why) for n in ("ours triton", "ours triton fp8")]

    def ours() -> torch.Tensor:
        return gg.grouped_gemm(x, w, offsets, swiglu=s.swiglu)

    note = "SwiGLU fused in the epilogue" if s.swiglu else ""
    rows.append(timed(shape, "ours triton", ours, same, ref, work, ceilings, quick, note))

    (xq, xs), (wq, ws) = act_quant(x), weight_quant(w)

    def ours_fp8() -> torch.Tensor:
        return gg.grouped_gemm_fp8(xq, xs, wq, ws, offsets, swiglu=s.swiglu)

    fp8_ref = gg.grouped_gemm_reference(
        act_dequant(xq, xs), weight_dequant(wq, ws), offsets, swiglu=s.swiglu
    )
    fp8_work = Work(bytes_read=work.bytes_read // 2, flops=work.flops)
    note = (
        f"1x128/128x128 scales; activations quantized beforehand (not timed); FP8 peak is ~2x "
        f"the bf16 GEMM; quantization error vs bf16 operands {rel_err(fp8_ref, ref):.1e}"
    )
    rows.append(timed(shape, "ours triton fp8", ours_fp8, same, fp8_ref, fp8_work, ceilings,
                      quick, note))  # fmt: skip
    return rows


def _swiglu(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(y.dtype)
