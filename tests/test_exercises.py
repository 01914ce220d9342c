"""The exercise checks: each passes its reference solution, and names the usual mistakes.

Every wrong answer below is a small edit of the solution that a learner could plausibly make;
the test asserts that the check rejects it with the message that explains *that* mistake.
The Triton kernel exercise runs in a subprocess under ``TRITON_INTERPRET=1`` (the interpreter
is chosen when a kernel is defined, see tests/test_fp8_quant.py).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3lite import exercises as ex
from dsv3lite.exercises import solutions as so

SEEDS = (0, 1, 2)


def _fails(check, answer, match: str, seed: int = 0) -> ex.ExerciseError:
    with pytest.raises(ex.ExerciseError, match=match) as info:
        check(answer, seed=seed)
    assert info.value.hint, "every failure carries a hint"
    assert f"seed={seed}" in str(info.value)
    return info.value


# ------------------------------------------------------------------------------ solutions pass
@pytest.mark.parametrize(
    "check, solution",
    [
        (ex.check_absorbed_query, so.absorbed_query),
        (ex.check_group_limited_topk, so.group_limited_topk),
        (ex.check_mtp_combine, so.mtp_combine),
        (ex.check_act_quant, so.act_quant),
        (ex.check_block_scaled_k_loop, so.block_scaled_k_loop),
        (ex.check_dispatch_counts, so.dispatch_counts),
        (ex.check_pipeline_bubble, so.pipeline_bubble),
        (ex.check_one_f_one_b, so.one_f_one_b),
        (ex.check_bias_update, so.bias_update),
        (ex.check_decode_step, so.decode_step),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_solution_passes(check, solution, capsys):
    for seed in (*SEEDS, None):
        check(solution, seed=seed)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SEEDS) + 1 and all(line.startswith("✓ correct") for line in lines)
    assert len(set(lines)) == 1, "the success line must not depend on the inputs (nbval)"


NUMPY_OR_TORCH_CHECKS = [
    ex.check_absorbed_query,
    ex.check_absorbed_values,
    ex.check_max_violation,
    ex.check_mtp_loss,
    ex.check_greedy_verify,
    ex.check_group_limited_topk,
    ex.check_mtp_combine,
    ex.check_act_quant,
    ex.check_block_scaled_k_loop,
    ex.check_dispatch_counts,
    ex.check_pipeline_bubble,
    ex.check_one_f_one_b,
    ex.check_bias_update,
    ex.check_decode_step,
]


def _stub(*args):
    """What a notebook hands a student: the body is ``...``."""
    ...


def _unwritten(*args):
    raise NotImplementedError


@pytest.mark.parametrize("stub", [_stub, _unwritten], ids=["returns None", "NotImplementedError"])
@pytest.mark.parametrize("check", NUMPY_OR_TORCH_CHECKS, ids=lambda c: c.__name__)
def test_an_unwritten_stub_is_not_an_error(check, stub, capsys):
    """Run All must reach the end of a notebook whose exercises are still open: the check of a
    stub prints one line naming the function and what to do, and raises nothing."""
    check(stub, seed=0)
    out = capsys.readouterr().out
    assert (
        out == f"… not done yet — {stub.__name__} is still the stub: write its body in the "
        "cell above, then run this cell again\n"
    )


def test_a_wrong_answer_is_still_an_error():
    with pytest.raises(ex.ExerciseError):
        ex.check_bias_update(lambda bias, load, gamma: bias * 0 + 1, seed=0)


def test_checks_leave_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ex.check_mtp_combine(so.mtp_combine, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_error_is_an_assertion_and_names_the_raising_function():
    def my_answer(mla, q_nope):
        raise KeyError("oops")

    err = _fails(ex.check_absorbed_query, my_answer, "my_answer raised KeyError")
    assert isinstance(err, AssertionError) and isinstance(err.__cause__, KeyError)


# ------------------------------------------------------------------------------ 01 MLA
def test_absorbed_query_mistakes():
    def wrong_layout(mla, q_nope):
        w = mla.kv_b_proj.weight[: mla.n_heads * mla.nope].view(
            mla.n_heads, mla.nope, mla.kv_lora_rank
        )
        return torch.einsum("bshd,hdc->bshc", q_nope, w)

    def head_minor(mla, q_nope):
        w = mla.kv_b_proj.weight.view(mla.nope + mla.v_dim, mla.n_heads, mla.kv_lora_rank)
        return torch.einsum("bshd,dhc->bshc", q_nope, w[: mla.nope])

    def scaled(mla, q_nope):
        return so.absorbed_query(mla, q_nope) * mla.softmax_scale

    _fails(ex.check_absorbed_query, lambda mla, q: q, "q_nope's own shape")
    _fails(ex.check_absorbed_query, wrong_layout, "first H·qk_nope_head_dim rows")
    _fails(ex.check_absorbed_query, head_minor, r"\[row within a head, head\]")
    _fails(ex.check_absorbed_query, scaled, "softmax scale")


# ------------------------------------------------------------------------------ 02 MoE
def _routing(select_with, group_score, fill, weigh_with="scores", normalise=True):
    """group_limited_topk with one ingredient changed."""

    def route(scores, bias, n_group, topk_group, k):
        biased = scores + bias
        chooser = biased if select_with == "biased" else scores
        n = scores.shape[0]
        grouped = chooser.view(n, n_group, -1)
        keep = group_score(grouped).topk(topk_group, dim=-1).indices
        drop = torch.ones(n, n_group, dtype=torch.bool).scatter_(1, keep, False)
        indices = grouped.masked_fill(drop[..., None], fill).flatten(1).topk(k, -1).indices
        w = (biased if weigh_with == "biased" else scores).gather(1, indices)
        return indices, w / w.sum(-1, keepdim=True) if normalise else w

    return route


def _plain_topk(scores, bias, n_group, topk_group, k):
    indices = (scores + bias).topk(k, -1).indices
    w = scores.gather(1, indices)
    return indices, w / w.sum(-1, keepdim=True)


def _top2(g):
    return g.topk(2, -1).values.sum(-1)


@pytest.mark.parametrize(
    "answer, match",
    [
        (_routing("scores", _top2, float("-inf")), "selected with the unbiased scores"),
        (_routing("biased", lambda g: g.amax(-1), float("-inf")), "by its best biased score"),
        (_routing("biased", lambda g: g.sum(-1), float("-inf")), "sum of all its biased"),
        (_routing("biased", _top2, 0.0), "masked the dropped groups with 0.0"),
        (
            _routing("biased", _top2, float("-inf"), weigh_with="biased"),
            "your weights differ when the bias is non-zero — did you use the biased scores "
            "for selection and the unbiased ones for weights",
        ),
        (_routing("biased", _top2, float("-inf"), normalise=False), "raw scores"),
        (_plain_topk, "top-k over all experts"),
        (
            lambda s, b, g, tg, k: ((s + b).topk(k, -1).indices.float(), s[:, :k]),
            "floating-point",
        ),
        (lambda s, b, g, tg, k: (s, s), r"one value per expert"),
        (lambda s, b, g, tg, k: s, "expected a pair"),
    ],
)
def test_group_limited_topk_mistakes(answer, match):
    for seed in SEEDS:
        _fails(ex.check_group_limited_topk, answer, match, seed)


# ------------------------------------------------------------------------------ 03 MTP
@pytest.mark.parametrize(
    "answer, match",
    [
        (
            lambda m, h, e: m.eh_proj(torch.cat([m.hnorm(h), m.enorm(e)], -1)),
            "wrong order",
        ),
        (lambda m, h, e: m.eh_proj(torch.cat([m.hnorm(e), m.enorm(h)], -1)), "norms are swapped"),
        (lambda m, h, e: m.eh_proj(torch.cat([e, h], -1)), "neither input is normalised"),
        (lambda m, h, e: m.eh_proj(torch.cat([m.enorm(e), h], -1)), "h_prev is not normalised"),
        (lambda m, h, e: torch.cat([m.enorm(e), m.hnorm(h)], -1), "that is the concatenation"),
        (lambda m, h, e: m.enorm(e) + m.hnorm(h), "relative error"),
    ],
)
def test_mtp_combine_mistakes(answer, match):
    _fails(ex.check_mtp_combine, answer, match)


# ------------------------------------------------------------------------------ 04 FP8 numerics
def _quant(scale_of, divide=True, zero_fix=True, dtype=torch.float8_e4m3fn):
    """act_quant with one ingredient changed; ``scale_of`` maps tiles [M, G, 128] to [M, G]."""

    def quant(x):
        m, k = x.shape
        tiles = x.view(m, k // 128, 128)
        s = scale_of(tiles)
        if zero_fix:
            s = torch.where(s > 0, s, 1.0)
        q = tiles / s[..., None] if divide else tiles * s[..., None]
        return q.clamp(-448, 448).to(dtype).view(m, k), s

    return quant


def _amax448(t):
    return t.abs().amax(-1) / 448


@pytest.mark.parametrize(
    "answer, match",
    [
        (_quant(_amax448, zero_fix=False), "your scale for a tile of all zeros is 0"),
        (_quant(lambda t: 448 / t.abs().amax(-1).clamp_min(1e-30)), "448 / amax, the inverse"),
        (_quant(lambda t: t.abs().amax(-1)), "your scale is amax itself"),
        (_quant(lambda t: t.amax(-1) / 448), r"the max of x, not of \|x\|"),
        (
            _quant(lambda t: t.abs().amax((-1, -2))[:, None].expand(t.shape[:2]) / 448),
            "one amax per row",
        ),
        (
            _quant(lambda t: t.abs().amax().expand(t.shape[:2]) / 448),
            "one scale for the whole tensor",
        ),
        (_quant(_amax448, divide=False), "q = x · s"),
        (_quant(_amax448, dtype=torch.float32), "torch.float8_e4m3fn"),
        (lambda x: (x.to(torch.float8_e4m3fn), _amax448(x)), r"one scale per token row"),
        (
            lambda x: (x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], x.shape[1] // 128)),
            "scale of row",
        ),
    ],
)
def test_act_quant_mistakes(answer, match):
    _fails(ex.check_act_quant, answer, match)


def test_act_quant_accepts_one_step_rounding_differences(capsys):
    def reciprocal(x):
        q, s = so.act_quant(x)
        inv = 1.0 / s
        tiles = x.view(x.shape[0], -1, 128)
        return (tiles * inv[..., None]).to(torch.float8_e4m3fn).view(x.shape), s

    for seed in range(5):
        ex.check_act_quant(reciprocal, seed=seed)
    assert capsys.readouterr().out.count("✓ correct") == 5


# ------------------------------------------------------------------------------ 05 FP8 kernels
def _k_loop(scale):
    """The K loop with the scaling step replaced by ``scale(partial, a_s, b_scale, kb)``."""

    def loop(a, a_s, b, b_s):
        n = b.shape[0]
        c = np.zeros((a.shape[0], n), dtype=np.float32)
        for kb in range(a.shape[1] // 128):
            cols = slice(kb * 128, (kb + 1) * 128)
            partial = a[:, cols] @ b[:, cols].T
            c += scale(partial, a_s, np.repeat(b_s[:, kb], 128)[:n], kb)
        return c

    return loop


@pytest.mark.parametrize(
    "answer, match",
    [
        (_k_loop(lambda p, a_s, bs, kb: p), "scales are missing"),
        (
            _k_loop(lambda p, a_s, bs, kb: p / a_s[:, kb, None] / bs[None, :]),
            "divided by the scales",
        ),
        (
            lambda a, a_s, b, b_s: (a @ b.T) * a_s[:, :1] * np.repeat(b_s[:, 0], 128)[: len(b)],
            "first block's scales",
        ),
        (lambda a, a_s, b, b_s: (a @ b.T).T, "that is Cᵀ"),
        (_k_loop(lambda p, a_s, bs, kb: p * a_s[:, kb, None] * bs[0]), "relative error"),
    ],
)
def test_block_scaled_k_loop_mistakes(answer, match):
    _fails(ex.check_block_scaled_k_loop, answer, match)


def test_tile_scale_kernel_without_interpreter_explains_it():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("explains the interpreter only on a CPU-only machine without it")
    with pytest.raises(ex.ExerciseError, match="TRITON_INTERPRET") as info:
        ex.check_tile_scale_kernel(so.tile_scale_kernel)
    assert "before importing triton" in str(info.value)
    with pytest.raises(ex.ExerciseError, match=r"@triton.jit"):
        ex.check_tile_scale_kernel(so.act_quant)


KERNELS = """
import triton
import triton.language as tl


@triton.jit
def stub(x_ptr, s_ptr, K, BLOCK: tl.constexpr):
    pass


@triton.jit
def no_zero_fix(x_ptr, s_ptr, K, BLOCK: tl.constexpr):
    row, tile = tl.program_id(0), tl.program_id(1)
    x = tl.load(x_ptr + row * K + tile * BLOCK + tl.arange(0, BLOCK))
    tl.store(s_ptr + row * (K // BLOCK) + tile, tl.max(tl.abs(x), axis=0) / 448.0)


@triton.jit
def no_abs(x_ptr, s_ptr, K, BLOCK: tl.constexpr):
    row, tile = tl.program_id(0), tl.program_id(1)
    x = tl.load(x_ptr + row * K + tile * BLOCK + tl.arange(0, BLOCK))
    s = tl.max(x, axis=0) / 448.0
    tl.store(s_ptr + row * (K // BLOCK) + tile, tl.where(s > 0, s, 1.0))


@triton.jit
def first_tile_only(x_ptr, s_ptr, K, BLOCK: tl.constexpr):
    row, tile = tl.program_id(0), tl.program_id(1)
    x = tl.load(x_ptr + row * K + tl.arange(0, BLOCK))
    s = tl.max(tl.abs(x), axis=0) / 448.0
    if tile == 0:
        tl.store(s_ptr + row * (K // BLOCK), tl.where(s > 0, s, 1.0))
"""

DRIVER = """
from dsv3lite import exercises as ex
from dsv3lite.exercises import solutions as so
import kernels_under_test as k

ex.check_tile_scale_kernel(so.tile_scale_kernel, seed=3)
ex.check_tile_scale_kernel(k.stub, seed=3)
for name in ("no_zero_fix", "no_abs", "first_tile_only"):
    try:
        ex.check_tile_scale_kernel(getattr(k, name), seed=3)
        print(name, "PASSED")
    except ex.ExerciseError as err:
        print(name, "FAILED:", str(err).splitlines()[0])
"""


LATE_DRIVER = """
import os
import triton  # imported first: the mistake

os.environ["TRITON_INTERPRET"] = "1"
from dsv3lite import exercises as ex
import kernels_under_test as k  # defined now, so interpreted; triton's helpers are not

try:
    ex.check_tile_scale_kernel(k.no_abs, seed=3)
except ex.ExerciseError as err:
    print("FAILED:", err)
"""


def _run(driver: str, tmp_path: Path, **env_extra: str) -> str:
    (tmp_path / "kernels_under_test.py").write_text(textwrap.dedent(KERNELS))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", driver],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_tile_scale_kernel_with_the_interpreter_set_too_late(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernel would not need the interpreter")
    out = _run(LATE_DRIVER, tmp_path)
    assert "FAILED: TRITON_INTERPRET=1 was set after triton was imported" in out, out
    assert "before importing triton" in out


def test_tile_scale_kernel_under_the_interpreter(tmp_path: Path):
    out = _run(DRIVER, tmp_path, TRITON_INTERPRET="1")
    assert "✓ correct — your kernel writes act_quant's 1×128 scales (through Triton" in out
    assert "no_zero_fix FAILED: s written by your kernel: your scale for a tile of all zeros" in out
    assert "no_abs FAILED: s written by your kernel: you took the max of x, not of |x|" in out
    assert "first_tile_only FAILED: s[0, 1] was never written" in out
    assert "… not done yet — stub is still the stub" in out


# ------------------------------------------------------------------------------ 06 expert parallel
def _tokens_per_rank(indices, n_experts, world_size):
    owner = indices // (n_experts // world_size)
    return [sum(r in set(row) for row in owner.tolist()) for r in range(world_size)]


@pytest.mark.parametrize(
    "answer, match",
    [
        (_tokens_per_rank, "you counted tokens, not \\(token, expert\\) pairs"),
        (
            lambda i, e, w: torch.bincount((i % w).flatten(), minlength=w),
            "rank e % world_size",
        ),
        (lambda i, e, w: torch.bincount(i.flatten(), minlength=e), "one count per expert"),
        (lambda i, e, w: so.dispatch_counts(i, e, w) // 2, "add up to"),
    ],
)
def test_dispatch_counts_mistakes(answer, match):
    _fails(ex.check_dispatch_counts, answer, match)


# ------------------------------------------------------------------------------ 07 DualPipe
def _bubble(**override):
    def bubble(kind, pp, F, B, W, FB):
        if kind in override:
            return override[kind](pp, F, B, W, FB)
        return so.pipeline_bubble(kind, pp, F, B, W, FB)

    return bubble


@pytest.mark.parametrize(
    "answer, match",
    [
        (_bubble(**{"1f1b": lambda pp, F, B, W, FB: pp * (F + B)}), "not PP"),
        (_bubble(zb1p=lambda pp, F, B, W, FB: (pp - 1) * (F + B - W)), "2W of each stage"),
        (
            _bubble(dualpipe=lambda pp, F, B, W, FB: (pp - 1) * (FB + B - 3 * W)),
            "PP/2−1, not PP−1",
        ),
        (
            _bubble(dualpipe=lambda pp, F, B, W, FB: (pp / 2 - 1) * (F + B + B - 3 * W)),
            "the first term is F&B",
        ),
        (lambda *args: "big", "expected a number"),
    ],
)
def test_pipeline_bubble_mistakes(answer, match):
    _fails(ex.check_pipeline_bubble, answer, match)


def _one_f_one_b(warmup_of):
    def ops(pp, rank, m):
        w = warmup_of(pp, rank, m)
        out = [f"F{i}" for i in range(w)]
        for i in range(w, m):
            out += [f"F{i}", f"B{i - w}"]
        return out + [f"B{i}" for i in range(m - w, m)]

    return ops


@pytest.mark.parametrize(
    "answer, match",
    [
        (_one_f_one_b(lambda pp, r, m: min(pp - r, m)), "should run .* forwards before"),
        (_one_f_one_b(lambda pp, r, m: min(r, m)), "should run .* forwards before"),
        (lambda pp, r, m: [f"B{i}" for i in range(m)] + [f"F{i}" for i in range(m)], "runs before"),
        (lambda pp, r, m: [f"F{i}" for i in range(m)], "exactly one F and one B"),
        (
            lambda pp, r, m: [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)],
            "forwards before its first backward",
        ),
        (lambda pp, r, m: 3, "expected a list of ops"),
    ],
)
def test_one_f_one_b_mistakes(answer, match):
    _fails(ex.check_one_f_one_b, answer, match)


# ------------------------------------------------------------------------------ 08 training
@pytest.mark.parametrize(
    "answer, match",
    [
        (
            lambda b, load, g: b + g * torch.sign(load.float() - load.float().mean()),
            "sign is reversed",
        ),
        (
            lambda b, load, g: b + g * (load.float().mean() - load.float()),
            "proportional to the violation",
        ),
        (
            lambda b, load, g: b + torch.where(load.float() > load.float().mean(), -g, g),
            "exactly at the mean load moved",
        ),
        (lambda b, load, g: b, "did not change"),
        (lambda b, load, g: b + g * torch.sign(load.mean() - load), "mean"),
    ],
)
def test_bias_update_mistakes(answer, match):
    _fails(ex.check_bias_update, answer, match)


def test_bias_update_in_place_is_fine(capsys):
    def in_place(bias, load, gamma):
        bias += gamma * torch.sign(load.float().mean() - load.float())

    ex.check_bias_update(in_place, seed=0)
    assert "✓ correct" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 09 inference
def _decode(zero_garbage=True, mask=True, rope=True, scale=True, softmax_dim=-1):
    def step(q_latent, q_pe, kv, k_pe, seqlens, softmax_scale):
        valid = torch.arange(kv.shape[1]) < seqlens[:, None]
        if not mask:
            valid = torch.ones_like(valid)
        if zero_garbage:
            kv = kv.masked_fill(~valid[..., None], 0.0)
            k_pe = k_pe.masked_fill(~valid[..., None], 0.0)
        s = torch.einsum("bhc,blc->bhl", q_latent, kv)
        if rope:
            s = s + torch.einsum("bhr,blr->bhl", q_pe, k_pe)
        s = (s * (softmax_scale if scale else 1.0)).masked_fill(~valid[:, None, :], float("-inf"))
        return torch.einsum("bhl,blc->bhc", s.softmax(softmax_dim), kv)

    return step


@pytest.mark.parametrize(
    "answer, match",
    [
        (_decode(rope=False), "RoPE part is missing"),
        (_decode(scale=False), "softmax scale is missing"),
        (_decode(softmax_dim=1), "softmax runs over heads"),
        (_decode(mask=False), "attended to every position"),
        (_decode(zero_garbage=False), "0 times NaN is still NaN"),
        (lambda q, qp, kv, kp, n, s: q[:, None], r"no token dimension"),
    ],
)
def test_decode_step_mistakes(answer, match):
    _fails(ex.check_decode_step, answer, match)
