"""The Triton experts with their backward (kernels/grouped_gemm.py ``moe_experts``,
``grouped_wgrad``; ``Experts.impl = "triton"``) against a per-pair fp64 loop: the MoE's output
and the gradients of its input, both expert stacks and the router.

On the CPU the kernels run through the Triton interpreter in a fresh process that sets
``TRITON_INTERPRET=1`` before the kernel module is imported (as tests/test_grouped_gemm.py
does); the same cases run natively on a GPU (marked ``gpu``). Experts that receive no token
must get an exactly zero gradient.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from models import per_pair_moe

# name -> dtype, tokens, overrides of the tiny preset (small, for the interpreter)
CASES = {
    "bf16": ("bfloat16", 24, dict(hidden_size=32, moe_intermediate_size=16)),
    "fp16, one group of 8 experts": (
        "float16",
        10,
        dict(hidden_size=48, moe_intermediate_size=32, n_routed_experts=8, n_group=1, topk_group=1),
    ),
    "decode: 3 tokens, most experts idle": (
        "float16",
        3,
        dict(hidden_size=32, n_group=1, topk_group=1),
    ),
}
TOLERANCE = 2e-2  # bf16 operands (the interpreter truncates fp32 → bf16), fp32 accumulation


def run_case(dtype: str, tokens: int, overrides: dict, device: str) -> dict[str, float]:
    """Relative errors of output and gradients; and how much gradient unused experts got."""
    from dsv3lite.config import preset
    from dsv3lite.model.moe import MoE
    from dsv3lite.testing import rel_err

    torch.manual_seed(0)
    moe = MoE(preset("tiny", **overrides))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.2)
    moe = moe.to(device, getattr(torch, dtype))
    moe.experts.impl = "triton"
    ref = copy.deepcopy(moe).double()
    x = torch.randn(tokens, moe.config.hidden_size, device=device).to(moe.gate.weight.dtype)
    probe = torch.randn_like(x)

    xs = x.clone().requires_grad_()
    y, routing = moe(xs)
    (y.float() * probe.float()).sum().backward()
    xr = x.double().requires_grad_()
    y_ref = per_pair_moe(ref, xr)
    (y_ref * probe.double()).sum().backward()

    unused = torch.ones(moe.config.n_routed_experts, dtype=torch.bool, device=device)
    unused[routing.indices.flatten()] = False
    out = {"y": rel_err(y, y_ref), "x": rel_err(xs.grad, xr.grad)}
    for name, p in ref.named_parameters():
        out[name] = rel_err(dict(moe.named_parameters())[name].grad, p.grad)
    out["unused_grad"] = moe.experts.gate_up_proj.grad[unused].abs().sum().item()
    out["unused"] = int(unused.sum())
    return out


def _worker() -> None:
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = run_case(*case, "cpu")
        except Exception as exc:  # report it to the test, which shows it
            results[name] = {"exception": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result: dict) -> None:
    assert "exception" not in result, result.get("exception")
    errors = {k: v for k, v in result.items() if k not in ("unused", "unused_grad")}
    assert len(errors) > 6 and all(v <= TOLERANCE for v in errors.values()), result
    assert result["unused_grad"] == 0.0, result


@pytest.mark.parametrize("name", CASES)
def test_triton_experts_forward_and_backward_interpreted(interpreted: dict, name: str) -> None:
    _check(interpreted[name])


def test_idle_experts_are_covered(interpreted: dict) -> None:
    assert interpreted["decode: 3 tokens, most experts idle"]["unused"] >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", CASES)
def test_triton_experts_forward_and_backward_gpu(name: str) -> None:
    _check(run_case(*CASES[name], "cuda"))


if __name__ == "__main__":
    _worker()
