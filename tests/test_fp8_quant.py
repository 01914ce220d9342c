"""FP8 quantizers (report §3.3.2): the torch references against their definition, then the
Triton kernels byte for byte against the references — on the CPU through Triton's interpreter
(in a subprocess, see ``run_interpreted``), on a GPU when there is one.

Policies checked: s = amax/448 per group, codes saturate at ±448, zero groups get s = 1,
NaN stays NaN, ±Inf saturates to its group's largest finite magnitude, UE8M0 scales are powers
of two.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3lite import fp8
from dsv3lite.kernels import fp8_quant as fq

FP8 = torch.float8_e4m3fn
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


FP8_TEST_FILES = ("test_fp8_quant.py", "test_fp8_gemm.py", "test_fp8_linear.py")


@functools.cache
def _interpreter_run() -> subprocess.CompletedProcess:
    """The ``test_triton_*`` tests of all FP8 test files, once, in a fresh process with
    TRITON_INTERPRET=1 (and the Triton backend forced).

    The interpreter takes effect when the kernels are *defined*, at import; this process has
    already imported them for the GPU, so the interpreter needs a process of its own. One
    process for the three files: Python, torch and Triton start once. One thread: the tiles
    are tiny, and on a busy machine threads wait on each other.
    """
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "DSV3LITE_FP8_BACKEND": "triton",
        "OMP_NUM_THREADS": "1",
    }
    here = Path(__file__).parent
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "test_triton_"]
    return subprocess.run(
        [*cmd, *(str(here / f) for f in FP8_TEST_FILES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=here.parent,
    )


def run_interpreted(test_file: str) -> None:
    """Assert that ``test_file``'s ``test_triton_*`` tests passed under the interpreter."""
    proc = _interpreter_run()
    name = Path(test_file).name
    ran = [line for line in proc.stdout.splitlines() if f"{name}::test_triton_" in line]
    assert ran, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = [line for line in ran if "PASSED" not in line]
    assert not failed and proc.returncode == 0, "\n".join(failed) + proc.stdout[-6000:]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors and hundreds of tiny GEMMs: a second thread saves nothing, and on a busy
    2-core machine two threads wait on each other (15 ms per small matmul instead of 10 µs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs under TRITON_INTERPRET=1 in test_interpreter_subprocess"
)


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_interpreter_subprocess():
    run_interpreted(__file__)


def poisoned(shape, dtype, device="cpu"):
    """Output buffers full of NaN (0x7F is E4M3's NaN): an unwritten element cannot pass."""
    if dtype == FP8:
        return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(FP8)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal E4M3 bytes, treating every NaN as equal to every NaN."""
    nan = a.float().isnan() & b.float().isnan()
    return bool(((a.view(torch.uint8) == b.view(torch.uint8)) | nan).all())


def hard_input(shape=(70, 300), dtype=torch.float32, seed=0) -> torch.Tensor:
    """Values over 18 decades (subnormal codes included), exact E4M3 rounding ties, an all-zero
    tile, a NaN and ±Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-12, 6, shape[-1])
    # row 8, first tile: amax 448 (so s = 1) and values halfway between E4M3 neighbours, in
    # every binade (8 + i + 1/2) · 2^(e-3), and in the subnormals (j + 1/2) · 2^-9
    ties = [(8 + i + 0.5) * 2.0 ** (e - 3) for e in range(-6, 8) for i in range(8)]
    ties += [(j + 0.5) * 2.0**-9 for j in range(8)]
    x[8, :128] = torch.rand(128, generator=g) * 400
    x[8, 0] = 448.0
    x[8, 1 : 1 + len(ties)] = torch.tensor(ties) * torch.tensor([1.0, -1.0]).repeat(60)
    x[5, :128] = 0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    x[3, 5], x[4, 200], x[6, 7] = float("nan"), float("inf"), float("-inf")
    return x


# ----------------------------------------------------------------------------- the references
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_reconstructs_within_half_a_step(dtype):
    x = torch.randn(3, 50, 300).to(dtype) * 5  # 3-D, K not a multiple of 128
    q, s = fp8.act_quant(x)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (3, 50, 3)
    assert s.dtype == torch.float32
    sx = s.repeat_interleave(128, -1)[..., :300]
    err = (q.float() * sx - x.float()).abs()
    # nearest rounding: half of E4M3's spacing (2^-3 relative, 2^-9 absolute in subnormals)
    assert bool((err <= x.float().abs() * 2**-4 + sx * 2**-10).all())


def test_scales_are_amax_over_448_and_codes_reach_448():
    x = torch.randn(40, 256) * torch.rand(40, 1) * 100
    x[7, 128:] = 0
    q, s = fq.act_quant_ref(x)
    amax = x.view(40, 2, 128).abs().amax(-1)
    expected = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert torch.equal(s, expected)
    codes = q.float().view(40, 2, 128).abs().amax(-1)
    assert torch.equal(codes, torch.where(amax > 0, 448.0, 0.0))


def test_nan_stays_nan_and_inf_saturates():
    x = torch.randn(2, 128)
    x[0, 3] = float("nan")
    x[1, 4], x[1, 5] = float("inf"), float("-inf")
    q, s = fq.act_quant_ref(x)
    finite = torch.where(x.isfinite(), x, 0.0)
    q_finite, s_finite = fq.act_quant_ref(finite)
    assert torch.equal(s, s_finite)  # the scale ignores the non-finite values
    assert q[0, 3].float().isnan() and q.float().isnan().sum() == 1
    assert q[1, 4].float() == 448 and q[1, 5].float() == -448
    keep = x.isfinite()
    assert torch.equal(q.float()[keep], q_finite.float()[keep])


def test_ue8m0_scales_are_powers_of_two_and_reconstruct():
    x = torch.randn(64, 384) * torch.logspace(-3, 3, 64)[:, None]
    q, s = fp8.act_quant(x, scale_fmt="ue8m0")
    _, s_exact = fp8.act_quant(x)
    mantissa, _ = torch.frexp(s)
    assert bool((mantissa == 0.5).all())  # 2^e exactly
    assert bool((s >= s_exact).all() and (s < 2 * s_exact).all())  # rounded up, by < 2×
    assert bool((q.float().abs() <= 448).all())
    deq = fp8.act_dequant(q, s)
    assert ((deq - x).norm() / x.norm()) < 0.04
    qw, sw = fp8.weight_quant(x, scale_fmt="ue8m0")
    assert bool((torch.frexp(sw)[0] == 0.5).all())
    assert ((fp8.weight_dequant(qw, sw) - x).norm() / x.norm()) < 0.04


def test_act_quant_t_quantizes_tokens_and_transposes():
    x = torch.randn(2, 100, 96)  # 200 tokens → padded to 256
    qt, st = fp8.act_quant_t(x)
    assert qt.shape == (96, 256) and st.shape == (96, 2)
    assert bool((qt[:, 200:].float() == 0).all())
    tokens = x.reshape(200, 96)
    amax0 = tokens[:128].abs().amax(0)  # channel-wise over the first 128 tokens
    assert torch.equal(st[:, 0], amax0 / 448)
    deq = fp8.act_dequant(qt, st)[:, :200].t()
    assert ((deq - tokens).norm() / tokens.norm()) < 0.04


def test_weight_quant_of_stacked_experts_is_per_expert():
    """[E, N, K] (the experts' stacked layout) gives each expert's own 128×128 blocks."""
    w = hard_input((3 * 70, 300)).view(3, 70, 300)
    q, s = fp8.weight_quant(w)
    assert s.shape == (3, 1, 3)
    for e in range(3):
        q_e, s_e = fp8.weight_quant(w[e])
        assert same_codes(q[e], q_e) and torch.equal(s[e], s_e)
    assert torch.equal(fp8.weight_dequant(q, s)[1], fp8.weight_dequant(q[1], s[1]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fp8.act_quant(torch.randn(4, 128).double()), "float32, bfloat16 or float16"),
        (lambda: fp8.act_quant(torch.ones(4, 128, dtype=torch.int32)), "float32"),
        (lambda: fp8.act_quant(torch.randn(4, 128), block_size=96), "power of two"),
        (lambda: fp8.act_quant(torch.randn(4, 128), scale_fmt="e8m0"), "scale_fmt"),
        (lambda: fp8.weight_quant(torch.randn(2, 2, 4, 128)), "3-D"),
        (lambda: fp8.act_quant_t(torch.randn(4, 0)), "non-empty"),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(INTERPRETED, reason="the interpreter accepts CPU tensors")
def test_backend_choice(monkeypatch):
    x = torch.randn(4, 128)
    assert fp8.quant.backend(x) == "torch"
    monkeypatch.setenv("DSV3LITE_FP8_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DSV3LITE_FP8_BACKEND"):
        fp8.act_quant(x)
    monkeypatch.setenv("DSV3LITE_FP8_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fp8.act_quant(x)


# ----------------------------------------------------------------------------- Triton == torch
QUANTIZERS = [
    (fq.act_quant_triton, fq.act_quant_ref),
    (fq.act_quant_t_triton, fq.act_quant_t_ref),
    (fq.weight_quant_triton, fq.weight_quant_ref),
]


def check_kernels_match(x: torch.Tensor, block_size: int = 128) -> None:
    """Every Triton quantizer gives the reference's bytes, into poisoned outputs."""
    for fmt in fq.SCALE_FMTS:
        for triton_fn, ref_fn in QUANTIZERS:
            q_ref, s_ref = ref_fn(x.cpu(), block_size, fmt)
            out = (
                poisoned(q_ref.shape, FP8, x.device),
                poisoned(s_ref.shape, torch.float32, x.device),
            )
            q, s = triton_fn(x, block_size, fmt, out=out)
            assert q is out[0] and s is out[1]
            assert same_codes(q.cpu(), q_ref), (triton_fn.__name__, fmt)
            assert torch.equal(s.cpu(), s_ref), (triton_fn.__name__, fmt)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_quantizers_match_reference(dtype):
    check_kernels_match(hard_input(dtype=dtype))


@interpreted
def test_triton_quantizers_every_code_and_small_blocks():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    x = torch.cat([codes[~codes.isnan()], codes[~codes.isnan()] * 1.03]).view(2, 254)
    x[:, 0] = 448.0  # each tile's amax is 448, so s = 1 and the values are the codes
    check_kernels_match(x)
    check_kernels_match(torch.randn(33, 70), block_size=32)


@interpreted
def test_triton_weight_quant_of_stacked_experts():
    w = hard_input((3 * 70, 300)).view(3, 70, 300)
    for fmt in fq.SCALE_FMTS:
        (q, s), (q_ref, s_ref) = (
            fq.weight_quant_triton(w, 128, fmt),
            fq.weight_quant_ref(w, 128, fmt),
        )
        assert same_codes(q, q_ref) and torch.equal(s, s_ref), fmt


@interpreted
def test_triton_public_api_dispatches_to_the_kernels():
    x = torch.randn(2, 130, 256)
    assert fp8.quant.backend(x) == "triton"
    for view in (x[:, ::2], x.transpose(0, 1), x[:, :, 64:]):  # strided rows, permuted, sliced
        for ours, ref in ((fp8.act_quant, fq.act_quant_ref), (fp8.act_quant_t, fq.act_quant_t_ref)):
            (q, s), (q_ref, s_ref) = ours(view), ref(view)
            assert same_codes(q, q_ref) and torch.equal(s, s_ref)
    q, s = fp8.act_quant(x[:0])  # no tokens
    assert q.shape == (0, 130, 256) and s.shape == (0, 130, 2)


@pytest.mark.gpu
@cuda
def test_gpu_quantizers_match_reference():
    check_kernels_match(hard_input((1000, 2000), dtype=torch.bfloat16).cuda())
    check_kernels_match(torch.randn(4096, 7168, device="cuda"))


def test_hard_input_has_what_it_claims():
    x = hard_input()
    assert x.isnan().sum() == 1 and x.isinf().sum() == 2
    q, s = fq.act_quant_ref(x)
    assert s[5, 0] == 1 and bool((q[5, :128].float() == 0).all())
    assert s[8, 0] == 1  # the row of ties is quantized at scale 1
    ties = x[8, 1:121].float()
    assert bool((q[8, 1:121].float() != ties).all())  # every one of them had to be rounded
    assert bool((q.float().abs() < 2**-6).any())  # some codes are subnormal
