"""Exercises of notebook 05: a tile's scale in a Triton kernel, and the block-scaled GEMM's K loop.

Both run on a laptop: the kernel through Triton's interpreter (``TRITON_INTERPRET=1``), the
K loop in NumPy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import TRITON_AVAILABLE, TRITON_MISSING_REASON
from ..testing import rel_err
from ._check import (
    ExerciseError,
    NotAttempted,
    as_tensor,
    call,
    close,
    diagnose,
    exercise,
    expect_shape,
    fresh_seed,
    passed,
    seeded,
)
from .fp8_numerics import BLOCK, check_scales, tricky_activations

KERNEL_HINT = (
    "row, tile = tl.program_id(0), tl.program_id(1); load x_ptr + row * K + tile * BLOCK + "
    "tl.arange(0, BLOCK); amax = tl.max(tl.abs(x), axis=0); s = amax / 448.0; store "
    "tl.where(s > 0, s, 1.0) at s_ptr + row * (K // BLOCK) + tile"
)
INTERPRETER_HELP = (
    "On a machine without a GPU, Triton runs kernels through its interpreter, which must be "
    "switched on *before* the kernel is defined: put\n"
    "    import os; os.environ['TRITON_INTERPRET'] = '1'\n"
    "in the first cell, before importing triton (or anything that imports it, such as "
    "dsv3lite.fp8), then restart the kernel and run the notebook from the top. @triton.jit "
    "reads the variable when it runs, and Triton's own helpers (tl.max, tl.cdiv, ...) are "
    "defined when triton is imported: set later, it leaves GPU kernels behind."
)
LOOP_HINT = (
    "C = zeros(M, N); for kb in range(K // 128): take columns kb*128:(kb+1)*128 of a and b, "
    "partial = a_blk @ b_blk.T, then C += partial * a_s[:, kb, None] * b_s[n // 128, kb] "
    "(one scale per row of a, one per 128 rows of b: np.repeat(b_s[:, kb], 128)[:N])"
)


def _device_for(kernel) -> torch.device:
    """Where ``kernel`` can run: the CPU under the interpreter, else a GPU (or explain)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError as err:
        raise ExerciseError(
            "Triton is not installed here (the course installs it on Linux x86-64 only)",
            hint="run this notebook on Linux, WSL2 or a hosted notebook; `pip install "
            "triton==3.6.0` there",
        ) from err
    if isinstance(kernel, InterpretedFunction):
        return torch.device("cpu")
    if not isinstance(kernel, JITFunction):
        raise ExerciseError(
            f"expected a Triton kernel, got {type(kernel).__name__}",
            hint="decorate your function with @triton.jit",
        )
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise ExerciseError(
        "your kernel was compiled for a GPU, and this machine has none", hint=INTERPRETER_HELP
    )


@exercise
def check_tile_scale_kernel(kernel, *, seed: int | None = None) -> None:
    """Check a ``@triton.jit`` kernel ``kernel(x_ptr, s_ptr, K, BLOCK: tl.constexpr)``.

    Launched on the grid (M, K // BLOCK) with BLOCK = 128, program (r, j) reads tile j of row r
    of ``x`` ([M, K] float32, row-major) and writes its scale, max |x| / 448 (1 for a tile of
    zeros), to ``s[r, j]`` ([M, K // BLOCK] float32, row-major) — the scale half of the
    package's ``_act_quant_kernel``. Runs on a GPU, or on the CPU through the interpreter
    (``TRITON_INTERPRET=1`` set before the kernel is defined: the check explains when it is
    not). ``s`` starts as NaN, so a tile the kernel skips shows. Checked against
    ``dsv3lite.fp8.act_quant``'s scales, tile with an outlier and all-zero tile included.
    Raises ExerciseError saying what is wrong; prints a line when right. Where Triton is not
    installed (macOS, Windows) it prints why it cannot run the kernel instead.
    """
    if not TRITON_AVAILABLE:
        print(f"not checked: {TRITON_MISSING_REASON}. The NumPy exercise below runs everywhere.")
        return
    device = _device_for(kernel)
    from ..kernels.fp8_quant import act_quant_ref

    seed = fresh_seed(seed)
    with seeded(seed):
        x = tricky_activations()
    m, k = x.shape
    ref = act_quant_ref(x)[1]
    s = torch.full((m, k // BLOCK), float("nan"), device=device)

    def your_kernel() -> None:
        kernel[(m, k // BLOCK)](x.to(device), s, k, BLOCK=BLOCK)

    try:
        call(your_kernel, (), seed, KERNEL_HINT, returns_none=True)
    except ExerciseError as err:
        if "outside of the scope of a kernel" in str(err):  # interpreter on, triton imported before
            raise ExerciseError(
                "TRITON_INTERPRET=1 was set after triton was imported: your kernel is "
                "interpreted, but Triton's helpers it calls were compiled for a GPU",
                hint=INTERPRETER_HELP,
                seed=seed,
            ) from err
        raise
    s = s.cpu()
    if torch.isnan(s).all():  # the stub: not a single scale written
        raise NotAttempted
    if torch.isnan(s).any():
        r, j = torch.isnan(s).nonzero()[0].tolist()
        zero = x[r, j * BLOCK : (j + 1) * BLOCK].abs().max() == 0
        if zero:
            raise ExerciseError(
                f"your scale for a tile of all zeros (row {r}, tile {j}) is NaN (0 / 0?), so "
                "dividing by it gives NaN",
                hint="tl.where(s > 0, s, 1.0)",
                seed=seed,
            )
        raise ExerciseError(
            f"s[{r}, {j}] was never written (it still holds the NaN it started with): does "
            "every program store its scale, at s_ptr + row * (K // BLOCK) + tile?",
            hint=KERNEL_HINT,
            seed=seed,
        )
    check_scales(s, x, ref, seed, "s written by your kernel")
    where = "through Triton's interpreter" if device.type == "cpu" else "on the GPU"
    passed(f"your kernel writes act_quant's 1×128 scales ({where})")


def _block_magnitudes(row_blocks: int, col_blocks: int, rows: int) -> torch.Tensor:
    """Factors 10^U(-2, 2), one per (rows × 128) block: [row_blocks · rows, col_blocks · 128]."""
    f = 10 ** (4 * torch.rand(row_blocks, col_blocks) - 2)
    return f.repeat_interleave(rows, 0).repeat_interleave(BLOCK, 1)


@exercise
def check_block_scaled_k_loop(k_loop: Callable, *, seed: int | None = None) -> None:
    """Check ``k_loop(a, a_s, b, b_s) -> C``, the block-scaled GEMM's K loop, in NumPy.

    ``a`` [M, K] and ``b`` [N, K] are E4M3 codes as float32 NumPy arrays (K a multiple of 128);
    ``a_s`` [M, K/128] holds one scale per row of ``a`` per 128 of K (1×128 tiles) and ``b_s``
    [ceil(N/128), K/128] one per 128×128 block of ``b``. The answer C [M, N] is
    Σ_kb (a_kb @ b_kbᵀ) · a_s[:, kb] · b_s[n // 128, kb]: each 128-wide K step's partial
    product scaled and added into an FP32 accumulator — the promotion of report §3.3.2. Checked
    against ``dsv3lite.kernels.fp8_gemm.fp8_gemm_ref`` (relative error ≤ 1e-5), on operands
    whose blocks differ in magnitude by up to 10⁴ so that a misplaced scale shows. Raises
    ExerciseError saying what is wrong; prints a line when right.
    """
    from ..kernels.fp8_gemm import fp8_gemm_ref
    from ..kernels.fp8_quant import act_quant_ref, weight_quant_ref

    seed = fresh_seed(seed)
    m, n, k = 8, 2 * BLOCK + 32, 4 * BLOCK
    with seeded(seed):
        x = torch.randn(m, k) * _block_magnitudes(m, k // BLOCK, rows=1)
        w = torch.randn(n, k) * _block_magnitudes(-(-n // BLOCK), k // BLOCK, rows=BLOCK)[:n]
    a8, a_s = act_quant_ref(x)  # the references: no interpreter run, even when one is set
    b8, b_s = weight_quant_ref(w)
    ref = fp8_gemm_ref(a8, a_s, b8, b_s, out_dtype=torch.float32)
    a, b = a8.float().numpy(), b8.float().numpy()
    args = (a.copy(), a_s.numpy().copy(), b.copy(), b_s.numpy().copy())
    got = as_tensor(call(k_loop, args, seed, LOOP_HINT), "C", seed).float()
    expect_shape(
        got,
        (m, n),
        "C",
        seed,
        LOOP_HINT,
        known={(n, m): "that is Cᵀ: C = a @ bᵀ is [M, N]", (m, k): "C = a @ bᵀ is [M, N]"},
    )
    if close(got, ref, 1e-5):
        passed("your K loop gives fp8_gemm_ref's product, scale by scale, block by block")
        return
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    b_rows = b_s.repeat_interleave(BLOCK, 0)[:n]  # [N, K/128]
    diagnose(
        got,
        [
            (
                at @ bt.t(),
                "C is the product of the raw codes: the scales are missing",
                LOOP_HINT,
            ),
            (
                (at @ bt.t()) * a_s[:, :1] * b_rows[None, :, 0],
                "you scaled the whole sum by the first block's scales; each 128-wide step of K "
                "has its own, applied to that step's partial product before it is added",
                LOOP_HINT,
            ),
            (
                sum(
                    (at[:, j * BLOCK : (j + 1) * BLOCK] @ bt[:, j * BLOCK : (j + 1) * BLOCK].t())
                    / a_s[:, j, None]
                    / b_rows[None, :, j]
                    for j in range(k // BLOCK)
                ),
                "you divided by the scales; the convention is x ≈ q · s, so multiply",
                LOOP_HINT,
            ),
        ],
        1e-5,
        seed,
    )
    raise ExerciseError(
        f"C differs from fp8_gemm_ref: relative error {rel_err(got, ref):.2e} (≤ 1e-5 expected)",
        hint=LOOP_HINT,
        seed=seed,
    )
