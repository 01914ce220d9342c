"""The Triton MLA decode kernel against its fp32 torch reference (kernels/mla_decode.py).

On the CPU the kernel runs through the Triton interpreter. ``@triton.jit`` picks the
interpreter when the kernel module is imported, so ``TRITON_INTERPRET=1`` must be set before
that import — and no other test may have imported it first. To be independent of test order,
the cases run in a fresh interpreter process (this file, run as a script with the variable
set); pytest reports them one by one from its JSON answer. The same cases, and larger ones,
run natively on a GPU (marked ``gpu``).

Every case uses fresh random inputs and poisons the cache: positions past each sequence's
length, and pages no sequence uses, hold NaN, so reading one would show in the output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

# name -> batch, tokens (T), heads, context (L), kv_lora_rank, rope dim, dtype, splits, page size
CASES: dict[str, dict[str, Any]] = {
    "tiny dims, 4 heads, one split": dict(b=2, t=1, h=4, L=70, dc=32, dr=16, dt="float16", splits=1),
    "tiny dims, split 3, ragged": dict(b=3, t=1, h=4, L=70, dc=32, dr=16, dt="bfloat16", splits=3),
    "512+64, 16 heads, one split": dict(b=2, t=1, h=16, L=200, dc=512, dr=64, dt="bfloat16", splits=1),
    "512+64, 16 heads, split 4": dict(b=2, t=1, h=16, L=200, dc=512, dr=64, dt="bfloat16", splits=4),
    "more splits than tiles": dict(b=2, t=1, h=4, L=70, dc=32, dr=16, dt="bfloat16", splits=8),
    "splits chosen (None)": dict(b=2, t=1, h=4, L=70, dc=32, dr=16, dt="bfloat16", splits=None),
    "MTP: 2 tokens, split 3": dict(b=2, t=2, h=16, L=130, dc=64, dr=16, dt="bfloat16", splits=3),
    "12 heads (not a power of 2)": dict(b=2, t=1, h=12, L=90, dc=64, dr=32, dt="float16", splits=2),
    "paged 16, tiles span pages": dict(b=2, t=1, h=16, L=200, dc=512, dr=64, dt="float16", splits=2, page=16),
    "paged 64, MTP, 12 heads": dict(b=3, t=2, h=12, L=150, dc=64, dr=16, dt="bfloat16", splits=3, page=64),
    "3-D queries [B, H, D]": dict(b=2, t=None, h=4, L=40, dc=32, dr=16, dt="bfloat16", splits=2),
    "length 1 (one key)": dict(b=2, t=1, h=4, L=40, dc=32, dr=16, dt="bfloat16", splits=2, lens=[1, 40]),
}  # fmt: skip

# name -> (what to break, the words the error must contain)
ERRORS: dict[str, tuple[str, str]] = {
    "fp32 cache": ("dtype", "must share a dtype"),
    "queries of another dtype": ("q_dtype", "cache dtype"),
    "lengths beyond the cache": ("too_long", "capacity"),
    "lengths shorter than T": ("too_short", "cache_seqlens must lie"),
    "heads differ between q and q_pe": ("heads", "disagree"),
    "kv_lora_rank not a power of 2": ("dim", "power of two"),
    "cache of another batch": ("batch", "batch"),
    "cache dims differ from queries": ("cache_dim", "do not match"),
    "page id outside the cache": ("page", "outside"),
    "max_seqlen beyond capacity": ("max_seqlen", "max_seqlen"),
    "block_table of another batch": ("table_batch", "block_table"),
}


def make_inputs(case: dict[str, Any], device: str, seed: int) -> dict[str, Any]:
    """Random queries and caches for one case, NaN past each length and in unused pages."""
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, case["dt"])
    b, h, L, dc, dr = case["b"], case["h"], case["L"], case["dc"], case["dr"]
    t = case["t"] or 1
    lens = case.get("lens") or torch.randint(t, L + 1, (b,), generator=gen).tolist()
    lens[0] = L  # one sequence fills the cache exactly

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dt)

    qshape = (b, h) if case["t"] is None else (b, t, h)
    q, q_pe = rand(*qshape, dc), rand(*qshape, dr)
    page = case.get("page")
    if page:
        per_seq = -(-L // page)
        pages = b * per_seq + 2  # two pages nobody uses
        table = torch.randperm(pages, generator=gen)[: b * per_seq].view(b, per_seq)
        kv, k_pe = rand(pages, page, dc), rand(pages, page, dr)
        flat = torch.full((pages,), True)
        flat[table.flatten()] = False
        kv[flat], k_pe[flat] = float("nan"), float("nan")
        for i, n in enumerate(lens):  # poison the tail of each sequence's last page
            pos = torch.arange(n, per_seq * page)
            kv[table[i, pos // page], pos % page] = float("nan")
            k_pe[table[i, pos // page], pos % page] = float("nan")
        table = table.to(torch.int32)
    else:
        table = None
        kv, k_pe = rand(b, L, dc), rand(b, L, dr)
        for i, n in enumerate(lens):
            kv[i, n:], k_pe[i, n:] = float("nan"), float("nan")
    to = {"device": device}
    return dict(
        q_latent=q.to(**to),
        q_pe=q_pe.to(**to),
        kv_cache=kv.to(**to),
        k_pe_cache=k_pe.to(**to),
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
        softmax_scale=(dc + dr) ** -0.5 * 1.3,
        block_table=None if table is None else table.to(**to),
    )


def run_case(case: dict[str, Any], device: str, seed: int = 0) -> float:
    """‖kernel − fp32 reference‖ / ‖reference‖ for one case."""
    from dsv3lite.kernels.mla_decode import mla_decode, mla_decode_reference

    inputs = make_inputs(case, device, seed)
    out = mla_decode(**inputs, num_splits=case["splits"])
    fp32 = {
        k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    ref = mla_decode_reference(**fp32)
    assert out.shape == ref.shape and out.dtype == inputs["kv_cache"].dtype
    return float((out.float() - ref).norm() / ref.norm())


def raise_error(what: str, device: str) -> str:
    """Break one thing about valid inputs; return the error's message (or 'no error')."""
    from dsv3lite.kernels.mla_decode import mla_decode

    paged = what in ("page", "table_batch")
    case = dict(
        b=2, t=1, h=4, L=40, dc=32, dr=16, dt="bfloat16", splits=1, page=16 if paged else None
    )
    x = make_inputs(case, device, seed=1)
    kwargs: dict[str, Any] = {}
    if what == "dtype":
        x["kv_cache"], x["k_pe_cache"] = x["kv_cache"].float(), x["k_pe_cache"].float()
    elif what == "q_dtype":
        x["q_latent"] = x["q_latent"].half()
    elif what == "too_long":
        x["cache_seqlens"][1] = 41
    elif what == "too_short":
        x["cache_seqlens"][1] = 0
    elif what == "heads":
        x["q_pe"] = x["q_pe"][..., :3, :]
    elif what == "dim":
        x["q_latent"] = x["q_latent"][..., :24]
    elif what == "batch":
        x["kv_cache"], x["k_pe_cache"] = x["kv_cache"][:1], x["k_pe_cache"][:1]
    elif what == "cache_dim":
        x["k_pe_cache"] = torch.cat([x["k_pe_cache"], x["k_pe_cache"]], dim=-1)
    elif what == "page":
        x["block_table"][1, 0] = 99
    elif what == "max_seqlen":
        kwargs["max_seqlen"] = 41
    elif what == "table_batch":
        x["block_table"] = x["block_table"][:1]
    try:
        mla_decode(**x, **kwargs)
    except ValueError as err:
        return str(err)
    return "no error"


def _worker() -> None:
    """Run every case (in this process, where TRITON_INTERPRET=1 is set); print JSON."""
    results: dict[str, Any] = {}
    for seed, (name, case) in enumerate(CASES.items()):
        try:
            results[name] = {"err": run_case(case, "cpu", seed)}
        except Exception as exc:  # report it to the test, which shows it
            results[name] = {"exception": f"{type(exc).__name__}: {exc}"}
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


@pytest.mark.parametrize("name", CASES)
def test_matches_reference_interpreted(interpreted: dict[str, Any], name: str) -> None:
    result = interpreted[name]
    assert "exception" not in result, result.get("exception")
    # the interpreter rounds fp32→bf16 toward zero, so bf16 outputs err about twice as much
    assert result["err"] <= 1e-2, result


@pytest.mark.parametrize("name", ERRORS)
def test_bad_inputs_raise_clear_errors(interpreted: dict[str, Any], name: str) -> None:
    assert ERRORS[name][1] in interpreted[name]["message"]


def test_cpu_tensors_need_the_interpreter() -> None:
    """Imported normally (compiled for a GPU), the kernel refuses CPU tensors up front."""
    from dsv3lite.kernels.mla_decode import INTERPRETED, mla_decode

    if INTERPRETED:
        pytest.skip("this process runs the interpreter")
    q = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 32, dtype=torch.bfloat16)
    q_pe, k_pe = torch.randn(1, 4, 16).bfloat16(), torch.randn(1, 8, 16).bfloat16()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        mla_decode(q, q_pe, kv, k_pe, torch.tensor([8]), 0.1)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_gpu(name: str) -> None:
    assert run_case(CASES[name], "cuda") <= 1e-2


GPU_CASES = {
    "H128, 3 x 4099, auto splits": dict(b=3, t=1, h=128, L=4099, dc=512, dr=64, dt="bfloat16", splits=None),
    "H16, 1 x 33000, auto splits": dict(b=1, t=1, h=16, L=33000, dc=512, dr=64, dt="bfloat16", splits=None),
    "H128, MTP, 5 x 2000, paged": dict(b=5, t=2, h=128, L=2000, dc=512, dr=64, dt="bfloat16", splits=None, page=64),
    "H64 fp16, 70 x 300, one split": dict(b=70, t=1, h=64, L=300, dc=512, dr=64, dt="float16", splits=1),
}  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", GPU_CASES)
def test_large_shapes_gpu(name: str) -> None:
    assert run_case(GPU_CASES[name], "cuda") <= 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ERRORS)
def test_bad_inputs_gpu(name: str) -> None:
    assert ERRORS[name][1] in raise_error(ERRORS[name][0], "cuda")


if __name__ == "__main__":
    _worker()
