"""The grouped expert GEMM, the weighted combine and the whole routed MoE (kernels/grouped_gemm.py).

On the CPU the kernels run through the Triton interpreter, in a fresh process that sets
``TRITON_INTERPRET=1`` before the kernel module is imported (``@triton.jit`` decides at import;
see tests/test_mla_decode.py); pytest reports the cases from its JSON answer. The same cases
run natively on a GPU (marked ``gpu``).

Poison: rows of x that no sorted row reads, and the weights of experts that receive no token,
hold NaN — reading either would show in the output. FP8 cases quantize the poisoned tensors,
so the NaN reaches the scales too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from dsv3lite.testing import rel_err

# name -> tokens, top-k, experts, K, N, dtype, fused SwiGLU, gather rows, experts left empty
CASES: dict[str, dict[str, Any]] = {
    "ragged K and N, empty experts": dict(t=13, k=3, e=6, K=48, N=40, dt="bfloat16", swiglu=False, gather=True, empty=[2, 5]),
    "pre-sorted rows (no gather)": dict(t=11, k=2, e=5, K=64, N=32, dt="float16", swiglu=False, gather=False, empty=[0]),
    "SwiGLU fused": dict(t=20, k=2, e=7, K=64, N=48, dt="float16", swiglu=True, gather=True, empty=[3]),
    "SwiGLU bf16, one expert": dict(t=9, k=1, e=1, K=32, N=16, dt="bfloat16", swiglu=True, gather=True, empty=[]),
    "all rows in one expert": dict(t=40, k=1, e=4, K=32, N=64, dt="bfloat16", swiglu=False, gather=True, empty=[0, 1, 3]),
    "decode: 64 experts, 3 tokens": dict(t=3, k=4, e=64, K=64, N=32, dt="bfloat16", swiglu=False, gather=True, empty=[]),
    "zero tokens": dict(t=0, k=2, e=4, K=32, N=16, dt="bfloat16", swiglu=False, gather=True, empty=[]),
    "fp8: N not a multiple of 128": dict(t=9, k=2, e=5, K=256, N=200, dt="float8_e4m3fn", swiglu=False, gather=True, empty=[3]),
    "fp8: SwiGLU, pre-sorted": dict(t=7, k=2, e=4, K=128, N=64, dt="float8_e4m3fn", swiglu=True, gather=False, empty=[0]),
}  # fmt: skip
# fp8 cases give fp32 outputs, checked against the product of the dequantized operands: exact
# up to summation order in the interpreter; on Hopper the tensor cores accumulate FP8 products
# with limited precision inside each 128-deep block (report §3.3.2)
TOLERANCE = {"cpu": {"fp8": 1e-5, "other": 1e-2}, "cuda": {"fp8": 2e-3, "other": 1e-2}}

ERRORS: dict[str, tuple[str, str]] = {
    "weights of another dtype": ("dtype", "share a dtype"),
    "fp32 inputs": ("fp32", "share a dtype"),
    "w not [E, N, K]": ("w_dims", "w [E, N, K]"),
    "K differs": ("k", "K="),
    "offsets of the wrong length": ("offsets", "offsets must be"),
    "SwiGLU with an odd N": ("swiglu", "gate then up"),
    "float src_rows": ("src_rows", "src_rows"),
    "combine shapes disagree": ("combine", "y_sorted"),
    "fp8 with K not a multiple of 128": ("fp8_k", "divisible by 128"),
    "fp8 scales of the wrong shape": ("fp8_scales", "w_scales must be"),
}


def route(case: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """[T, top-k] distinct expert ids per token, avoiding the experts meant to stay empty."""
    allowed = torch.tensor([e for e in range(case["e"]) if e not in case["empty"]])
    picks = [
        allowed[torch.randperm(len(allowed), generator=gen)[: case["k"]]] for _ in range(case["t"])
    ]
    return torch.stack(picks) if picks else torch.empty(0, case["k"], dtype=torch.long)


def run_case(case: dict[str, Any], device: str, seed: int = 0) -> dict[str, float]:
    """Relative errors of the grouped GEMM and of the combine against fp32 references."""
    from dsv3lite.fp8 import act_dequant, act_quant, weight_dequant, weight_quant
    from dsv3lite.kernels.grouped_gemm import (
        grouped_gemm,
        grouped_gemm_fp8,
        grouped_gemm_reference,
        moe_combine,
        moe_permute,
    )

    gen = torch.Generator().manual_seed(seed)
    fp8 = case["dt"] == "float8_e4m3fn"
    n_w = 2 * case["N"] if case["swiglu"] else case["N"]
    indices = route(case, gen)
    perm = moe_permute(indices.to(device), case["e"])
    x = torch.randn(case["t"] + 3, case["K"], generator=gen)  # 3 rows nobody reads
    w = torch.randn(case["e"], n_w, case["K"], generator=gen) / case["K"] ** 0.5
    w[case["empty"]] = float("nan")
    x[case["t"] :] = float("nan")
    x, w, src = x.to(device), w.to(device), perm.src_rows
    if not case["gather"]:  # the caller permuted already: x holds the sorted rows
        x, src = x[src.long()], None
    swiglu = case["swiglu"]
    if fp8:
        (xq, xs), (wq, ws) = act_quant(x), weight_quant(w)
        out_dtype = torch.float32
        y = grouped_gemm_fp8(
            xq, xs, wq, ws, perm.offsets, src_rows=src, swiglu=swiglu, out_dtype=out_dtype
        )
        x, w = act_dequant(xq, xs), weight_dequant(wq, ws)
    else:
        out_dtype = getattr(torch, case["dt"])
        x, w = x.to(out_dtype), w.to(out_dtype)
        y = grouped_gemm(x, w, perm.offsets, src_rows=src, swiglu=swiglu)
    ref = grouped_gemm_reference(x, w, perm.offsets, src_rows=src, swiglu=swiglu)
    assert y.shape == ref.shape == (case["t"] * case["k"], case["N"]) and y.dtype == out_dtype
    g = torch.rand(case["t"], case["k"], generator=gen).to(device)
    out = moe_combine(y, perm.pos, g)
    # combine reference: scatter-add of weighted rows, in fp32
    flat_g = torch.empty_like(g.flatten())
    flat_g[perm.pos.flatten().long()] = g.flatten()  # the weight of each sorted row
    out_ref = torch.zeros(case["t"], case["N"], device=device).index_add_(
        0, perm.src_rows.long(), ref * flat_g[:, None]
    )
    assert out.shape == out_ref.shape and out.dtype == out_dtype
    if ref.numel() == 0:
        return {"gemm": 0.0, "combine": 0.0}
    return {"gemm": rel_err(y, ref), "combine": rel_err(out, out_ref)}


def routed_moe_error(device: str) -> float:
    """moe_forward on the model's stacked experts against its local dispatch (bf16, tiny)."""
    from dsv3lite.config import preset
    from dsv3lite.kernels.grouped_gemm import moe_forward
    from dsv3lite.model.moe import LocalDispatcher, MoE

    torch.manual_seed(0)
    config = preset("tiny")
    moe = MoE(config).to(device, torch.bfloat16)
    moe.experts.impl = "local"
    with torch.no_grad():
        moe.gate.weight.normal_()
        x = torch.randn(10, config.hidden_size, device=device, dtype=torch.bfloat16)
        routing = moe.gate(x)
        ref = LocalDispatcher()(moe.experts, None, x, routing)
        experts = moe.experts
        out = moe_forward(
            x, routing.indices, routing.weights, experts.gate_up_proj, experts.down_proj
        )
    return rel_err(out, ref.float())


def raise_error(what: str, device: str) -> str:
    """Break one thing about valid inputs; return the error's message (or 'no error')."""
    from dsv3lite.fp8 import act_quant, weight_quant
    from dsv3lite.kernels.grouped_gemm import grouped_gemm, grouped_gemm_fp8, moe_combine

    bf = dict(device=device, dtype=torch.bfloat16)
    x, w = torch.randn(6, 32, **bf), torch.randn(3, 16, 32, **bf)
    offsets = torch.tensor([0, 2, 2, 6], dtype=torch.int32, device=device)
    kwargs: dict[str, Any] = {}
    if what == "dtype":
        w = w.half()
    elif what == "fp32":
        x, w = x.float(), w.float()
    elif what == "w_dims":
        w = w[0]
    elif what == "k":
        w = w[..., :16]
    elif what == "offsets":
        offsets = offsets[:3]
    elif what == "swiglu":
        w, kwargs["swiglu"] = w[:, :15], True
    elif what == "src_rows":
        kwargs["src_rows"] = torch.zeros(6, device=device)
    try:
        if what.startswith("fp8"):
            k = 96 if what == "fp8_k" else 128
            xq, xs = act_quant(torch.randn(6, 128, device=device))
            wq, ws = weight_quant(torch.randn(3, 16, 128, device=device))
            if what == "fp8_k":
                xq, wq = xq[:, :k], wq[..., :k]
            else:
                ws = ws[:, :, :0]
            grouped_gemm_fp8(xq, xs, wq, ws, offsets)
        elif what == "combine":
            pos = torch.zeros(2, 2, dtype=torch.int32, device=device)  # 4 pairs, 6 rows
            moe_combine(x, pos, torch.ones(2, 2, device=device))
        else:
            grouped_gemm(x, w, offsets, **kwargs)
    except ValueError as err:
        return str(err)
    return "no error"


def _worker() -> None:
    """Run every case (in this process, where TRITON_INTERPRET=1 is set); print JSON."""
    results: dict[str, Any] = {}
    for seed, (name, case) in enumerate(CASES.items()):
        try:
            results[name] = run_case(case, "cpu", seed)
        except Exception as exc:  # report it to the test, which shows it
            results[name] = {"exception": f"{type(exc).__name__}: {exc}"}
    results["routed MoE"] = {"err": routed_moe_error("cpu")}
    for name, (what, _) in ERRORS.items():
        results[name] = {"message": raise_error(what, "cpu")}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tolerance(name: str, device: str) -> float:
    kind = "fp8" if {**CASES, **GPU_CASES}[name]["dt"] == "float8_e4m3fn" else "other"
    return TOLERANCE[device][kind]


# bf16 under the interpreter: its fp32→bf16 conversion truncates, so allow 1e-2 throughout
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_interpreted(interpreted: dict[str, Any], name: str) -> None:
    result = interpreted[name]
    assert "exception" not in result, result.get("exception")
    tol = _tolerance(name, "cpu")
    assert result["gemm"] <= tol and result["combine"] <= tol, result


def test_routed_moe_matches_the_model_interpreted(interpreted: dict[str, Any]) -> None:
    assert interpreted["routed MoE"]["err"] <= 2e-2


@pytest.mark.parametrize("name", ERRORS)
def test_bad_inputs_raise_clear_errors(interpreted: dict[str, Any], name: str) -> None:
    assert ERRORS[name][1] in interpreted[name]["message"]


def test_permutation_groups_rows_by_expert() -> None:
    """Plain torch: offsets count each expert's rows; src_rows and pos invert each other."""
    from dsv3lite.kernels.grouped_gemm import moe_permute

    indices = torch.tensor([[2, 0], [1, 2], [2, 3]])
    perm = moe_permute(indices, 5)
    assert perm.offsets.tolist() == [0, 1, 2, 5, 6, 6]
    experts = indices.flatten()[perm.pos.flatten().argsort()]
    assert experts.tolist() == sorted(experts.tolist())
    assert perm.src_rows[perm.pos.flatten().long()].tolist() == [0, 0, 1, 1, 2, 2]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_CASES = {
    "32 experts, 4096 x 8, 7168→2048 width": dict(t=4096, k=8, e=32, K=1024, N=2048, dt="bfloat16", swiglu=False, gather=True, empty=[7]),
    "SwiGLU, 256 experts, decode": dict(t=64, k=8, e=256, K=7168, N=256, dt="bfloat16", swiglu=True, gather=True, empty=[0, 9]),
    "fp8, 32 experts, 2048 x 8": dict(t=2048, k=8, e=32, K=2048, N=1024, dt="float8_e4m3fn", swiglu=False, gather=True, empty=[4]),
    "fp8 SwiGLU, 64 experts": dict(t=512, k=8, e=64, K=1024, N=256, dt="float8_e4m3fn", swiglu=True, gather=True, empty=[]),
}  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", [*CASES, *GPU_CASES])
def test_matches_reference_gpu(name: str) -> None:
    result = run_case({**CASES, **GPU_CASES}[name], "cuda")
    tol = _tolerance(name, "cuda")
    assert result["gemm"] <= tol and result["combine"] <= tol, result


@pytest.mark.gpu
@needs_gpu
def test_routed_moe_matches_the_model_gpu() -> None:
    assert routed_moe_error("cuda") <= 2e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ERRORS)
def test_bad_inputs_gpu(name: str) -> None:
    assert ERRORS[name][1] in raise_error(ERRORS[name][0], "cuda")


if __name__ == "__main__":
    _worker()
