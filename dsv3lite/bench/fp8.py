"""``bench fp8``: our Triton FP8 kernels against cuBLAS, timed in one run, one table.

Three groups of rows, each op checked against its reference before it is timed:

* GEMM, the report's shapes (M = 4096 with the (N, K) of DeepSeek-V3's projections, 8192³,
  and a decode-sized M = 128): ours (``fp8_gemm``, 1×128 · 128×128 scales), cuBLAS bf16
  (``torch.matmul``), and cuBLAS's own blockwise FP8 GEMM through ``torch._scaled_mm``
  ("unsupported" where this torch refuses it). TFLOP/s = 2MNK / time.
* 1×128 activation quantization of 16384×7168 bf16 (and the 128×1 transposed variant), in
  GB/s of bytes moved (read 2, write 1 per element, plus the scales), against a plain
  device-to-device copy of the same tensor measured in the same run: the memory ceiling.
* FP8Linear forward + backward (three FP8 GEMMs and five quantizations) against a bf16
  ``nn.Linear`` forward + backward, M = 8192 tokens, 7168→2048 and 2048→7168.

Timing: ``harness.median_ms``. Inputs are random normal. On the CPU, ``run`` times tiny
shapes with the torch reference: a smoke test, not a figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..fp8 import (
    FP8Linear,
    act_dequant,
    act_quant,
    act_quant_t,
    fp8_gemm,
    weight_dequant,
    weight_quant,
)
from ..kernels.fp8_quant import act_quant_ref, act_quant_t_ref
from ..testing import rel_err
from .harness import Results, Row, median_ms

# (M, N, K): DeepSeek-V3's projections at 4096 tokens, a square GEMM, one decode-sized M.
GPU_GEMMS = [
    (4096, 7168, 2048),
    (4096, 2112, 7168),
    (4096, 24576, 1536),
    (4096, 7168, 16384),
    (8192, 8192, 8192),
    (128, 7168, 2048),
]
GPU_QUANT = (16384, 7168)
GPU_LINEARS = [(8192, 7168, 2048), (8192, 2048, 7168)]  # (tokens, in_features, out_features)
CPU_GEMMS = [(256, 384, 512), (32, 256, 256)]
CPU_QUANT = (512, 1024)
CPU_LINEARS = [(256, 256, 384)]


def _column_major(s: torch.Tensor) -> torch.Tensor:
    """The same matrix, stored column by column (the scale layout cuBLAS's blockwise wants)."""
    return s.t().contiguous().t()


def bench_gemm(m: int, n: int, k: int, device: torch.device, quick: bool) -> list[Row]:
    """Ours, cuBLAS bf16 and cuBLAS blockwise FP8 on one (M, N, K)."""
    shape = f"M{m} N{n} K{k}"
    tflops = 2 * m * n * k / 1e9  # divided by milliseconds: TFLOP/s
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    xq, xs = act_quant(x)
    wq, ws = weight_quant(w)
    ref = act_dequant(xq, xs).double() @ weight_dequant(wq, ws).double().t()
    ours = fp8_gemm(xq, xs, wq, ws)
    err = rel_err(ours, ref)
    # fp32 output: the tensor cores' in-step accumulation error, without bf16's output rounding
    err32 = rel_err(fp8_gemm(xq, xs, wq, ws, torch.float32), ref)
    if not err <= 1e-2:
        raise AssertionError(f"fp8_gemm {shape}: relative error {err:.2e} against its reference")
    rows = []
    ms = median_ms(lambda: fp8_gemm(xq, xs, wq, ws), device, quick)
    note = f"err {err:.1e}, fp32 out {err32:.1e}"
    rows.append(Row(f"gemm ours {shape}", shape, ms, tflops / ms, "TFLOP/s", note))
    ms = median_ms(lambda: x @ w.t(), device, quick)
    rows.append(Row(f"gemm bf16 {shape}", shape, ms, tflops / ms, "TFLOP/s", "torch.matmul"))
    rows.append(_blockwise_row(xq, xs, wq, ws, ref, shape, tflops, device, quick))
    return rows


def _blockwise_row(xq, xs, wq, ws, ref, shape, tflops, device, quick) -> Row:
    """cuBLAS's 1×128 · 128×128 FP8 GEMM (scales column-major, b as the transpose of a row-major weight); 'unsupported' if torch refuses."""
    name = f"gemm cublas-blockwise {shape}"

    def call() -> torch.Tensor:
        return torch._scaled_mm(
            xq,
            wq.t(),
            scale_a=_column_major(xs),
            scale_b=_column_major(ws.t()),
            out_dtype=torch.bfloat16,
        )

    try:
        out = call()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        return Row(
            name, shape, None, None, "TFLOP/s", f"unsupported: {str(e).splitlines()[0][:80]}"
        )
    err = rel_err(out, ref)
    if err > 1e-2:
        return Row(name, shape, None, None, "TFLOP/s", f"skipped: relative error {err:.2e}")
    ms = median_ms(call, device, quick)
    return Row(name, shape, ms, tflops / ms, "TFLOP/s", f"torch._scaled_mm, err {err:.1e}")


def bench_quant(m: int, k: int, device: torch.device, quick: bool) -> list[Row]:
    """act_quant and act_quant_t in GB/s, against a device-to-device copy of the same tensor."""
    shape = f"{m}x{k} bf16"
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    agreement = {}
    for ours, ref in ((act_quant, act_quant_ref), (act_quant_t, act_quant_t_ref)):
        (q, s), (q_ref, s_ref) = ours(x), ref(x)
        # reported, not hidden: how many codes and scales differ from the torch reference
        step = (q.view(torch.uint8).int() - q_ref.view(torch.uint8).int()).abs()
        s_err = ((s - s_ref).abs() / s_ref.abs().clamp_min(1e-30)).max().item()
        agreement[ours.__name__] = (
            f"vs reference: {int((step > 0).sum())} of {q.numel():,} codes differ "
            f"(max {int(step.max())} steps), scales max rel diff {s_err:.1e}"
        )
    err = rel_err(act_dequant(*act_quant(x)), x.float())
    moved = m * k * 3 + m * math.ceil(k / 128) * 4  # read bf16, write e4m3, write the scales
    moved_t = m * k * 3 + k * math.ceil(m / 128) * 4
    dst = torch.empty_like(x)
    rows = []
    ms = median_ms(lambda: dst.copy_(x), device, quick)
    rows.append(Row("copy d2d", shape, ms, 2 * x.nbytes / ms / 1e6, "GB/s", "read + write"))
    ms = median_ms(lambda: act_quant(x), device, quick)
    note = f"err {err:.1e}; {agreement['act_quant']}"
    rows.append(Row("act_quant 1x128", shape, ms, moved / ms / 1e6, "GB/s", note))
    ms = median_ms(lambda: act_quant_t(x), device, quick)
    note = f"fused transpose; {agreement['act_quant_t']}"
    rows.append(Row("act_quant_t 128x1", shape, ms, moved_t / ms / 1e6, "GB/s", note))
    return rows


def bench_linear(m: int, d_in: int, d_out: int, device: torch.device, quick: bool) -> list[Row]:
    """FP8Linear vs bf16 nn.Linear, forward + backward (3 GEMMs each), in TFLOP/s."""
    shape = f"M{m} {d_in}->{d_out}"
    tflops = 3 * 2 * m * d_in * d_out / 1e9  # divided by milliseconds: TFLOP/s
    torch.manual_seed(0)
    fp8 = FP8Linear(d_in, d_out, device=device)
    bf16 = nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(fp8.weight)
    x = torch.randn(m, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, d_out, device=device, dtype=torch.bfloat16)
    _check_linear(fp8, x, dy, shape)

    def step(layer: nn.Module) -> Callable[[], None]:
        def run_once() -> None:
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(dy)

        return run_once

    rows = []
    for name, layer in (("fp8", fp8), ("bf16", bf16)):
        ms = median_ms(step(layer), device, quick)
        rows.append(Row(f"linear {name} {shape}", shape, ms, tflops / ms, "TFLOP/s", "fwd+bwd"))
    return rows


def _check_linear(layer: FP8Linear, x: torch.Tensor, dy: torch.Tensor, shape: str) -> None:
    """FP8Linear's output and both gradients within a few 1e-2 of a float64 nn.Linear."""
    xr = x.detach().double().requires_grad_()
    wr = layer.weight.detach().double().requires_grad_()
    (xr @ wr.t()).backward(dy.double())
    y = layer(x)
    y.backward(dy)
    errs = {
        "y": rel_err(y, xr.detach() @ wr.detach().t()),
        "dx": rel_err(x.grad, xr.grad),
        "dW": rel_err(layer.weight.grad, wr.grad),
    }
    x.grad = layer.weight.grad = None
    bad = {k: v for k, v in errs.items() if v > 0.1}
    if bad:
        raise AssertionError(f"FP8Linear {shape}: relative errors {bad} against float64")


def run(device: torch.device, quick: bool) -> Results:
    """Every row on the GPU's shapes (tiny ones on the CPU), with ours / baseline ratios."""
    gpu = device.type == "cuda"
    gemms, quant, linears = (
        (GPU_GEMMS, GPU_QUANT, GPU_LINEARS) if gpu else (CPU_GEMMS, CPU_QUANT, CPU_LINEARS)
    )
    if quick:
        gemms, linears = gemms[:1] + gemms[-1:], linears[:1]
    torch.manual_seed(0)
    res = Results()
    for m, n, k in gemms:
        res.rows += bench_gemm(m, n, k, device, quick)
        s = f"M{m} N{n} K{k}"
        ours = f"gemm ours {s}"
        res.ratio(f"ours / cublas-blockwise {s}", ours, f"gemm cublas-blockwise {s}", by="value")
        res.ratio(f"ours / bf16 {s}", ours, f"gemm bf16 {s}", by="value")
    res.rows += bench_quant(*quant, device, quick)
    res.ratio("act_quant / copy", "act_quant 1x128", "copy d2d", by="value")
    for m, d_in, d_out in linears:
        res.rows += bench_linear(m, d_in, d_out, device, quick)
        s = f"M{m} {d_in}->{d_out}"
        res.ratio(f"FP8Linear / bf16 Linear {s}", f"linear fp8 {s}", f"linear bf16 {s}", by="value")
    return res
