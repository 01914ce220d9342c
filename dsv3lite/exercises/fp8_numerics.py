"""Exercise of notebook 04: 1×128 activation quantization (report §3.3.2)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..fp8 import BLOCK, FP8, FP8_MAX
from ._check import (
    ExerciseError,
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

HINT = (
    "per row, per 128 columns: amax = |x|.amax over the tile, s = amax / 448 (1 where amax "
    "is 0), q = (x / s).to(torch.float8_e4m3fn); return q [M, K] and s [M, K/128] float32"
)
ZERO_TILE_HINT = "give a tile of all zeros the scale 1: torch.where(s > 0, s, 1.0)"


def tricky_activations(m: int = 6, k: int = 384) -> torch.Tensor:
    """Activations [m, k] (k a multiple of 128) with the tiles a quantizer gets wrong: an
    all-zero tile (row 2, tile 1), a tile with an outlier (row 4, tile 0: one value 1000× its
    neighbours), a tile whose largest magnitude is negative (row 1, tile 2), and rows of
    different magnitudes. Uses torch's global generator (seed it first)."""
    x = torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]
    x[2, BLOCK : 2 * BLOCK] = 0.0
    x[4, 17] = 1000.0 * x[4, :BLOCK].abs().max()
    x[1, 2 * BLOCK + 5] = -50.0 * x[1, 2 * BLOCK :].abs().max()
    return x


def _tiles(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, BLOCK)


def _one_where_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, 1.0)


def check_scales(s: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, seed: int, what: str):
    """Compare scales ``s`` of ``x`` with ``ref`` (act_quant's), naming the usual mistakes.
    Shared with notebook 05's Triton exercise, which computes the same scales in a kernel."""
    m, k = x.shape
    expect_shape(
        s,
        tuple(ref.shape),
        what,
        seed,
        HINT,
        known={
            (m,): "one scale per token row; a 1×128 tile has its own scale",
            (m, 1): "one scale per token row; a 1×128 tile has its own scale",
            (m, k): "one scale per element; a 1×128 tile shares one scale",
            (k // BLOCK,): "one scale per 128 columns for all rows; each row's tile has its own",
            (): "one scale for the whole tensor; each 1×128 tile has its own",
        },
    )
    s = s.float()
    zero = _tiles(x).abs().amax(-1) == 0
    if not torch.isfinite(s[zero]).all() or (s[zero] == 0).any():
        raise ExerciseError(
            f"{what}: your scale for a tile of all zeros is {s[zero][0].item()}, so dividing "
            "by it gives NaN",
            hint=ZERO_TILE_HINT,
            seed=seed,
        )
    if close(s, ref, 1e-6) and torch.allclose(s, ref, rtol=1e-6, atol=0):
        return
    amax = _tiles(x).abs().amax(-1)
    diagnose(
        s,
        [
            (
                _one_where_zero(FP8_MAX / amax.clamp_min(1e-30)),
                f"{what}: you stored 448 / amax, the inverse; the convention is x ≈ q · s, "
                "so s = amax / 448",
                HINT,
            ),
            (
                _one_where_zero(amax),
                f"{what}: your scale is amax itself; divide it by 448 (E4M3's largest finite "
                "value) so that the tile's largest magnitude lands on 448",
                HINT,
            ),
            (
                _one_where_zero(_tiles(x).amax(-1) / FP8_MAX),
                f"{what}: you took the max of x, not of |x|: a tile whose largest magnitude is "
                "negative gets a scale that is too small (or negative)",
                HINT,
            ),
            (
                _one_where_zero(x.abs().amax(-1, keepdim=True) / FP8_MAX).expand_as(ref),
                f"{what}: you took one amax per row: a tile's scale must come from that tile "
                "alone, so that an outlier coarsens only its own 127 neighbours",
                HINT,
            ),
            (
                _one_where_zero(x.abs().amax() / FP8_MAX).expand_as(ref),
                f"{what}: you used one scale for the whole tensor; each 1×128 tile gets its own",
                HINT,
            ),
        ],
        1e-6,
        seed,
    )
    sorted_ok = torch.allclose(s.flatten().sort().values, ref.flatten().sort().values, rtol=1e-6)
    if sorted_ok:
        raise ExerciseError(
            f"{what}: the right scales, in the wrong places: row r, tile j belongs at s[r, j]",
            hint=HINT,
            seed=seed,
        )
    bad = (~torch.isclose(s, ref, rtol=1e-6, atol=0)).nonzero()[0].tolist()
    raise ExerciseError(
        f"{what}: scale of row {bad[0]}, tile {bad[1]} is {s[tuple(bad)].item():.6g}, "
        f"expected {ref[tuple(bad)].item():.6g}",
        hint=HINT,
        seed=seed,
    )


@exercise
def check_act_quant(act_quant: Callable, *, seed: int | None = None) -> None:
    """Check ``act_quant(x) -> (q, s)``: E4M3 codes and 1×128 tile scales, x ≈ q · s.

    ``x`` [M, K] float32, K a multiple of 128. The answer: ``s`` [M, K/128] float32, each tile's
    max |x| divided by 448 (1 for a tile of zeros), and ``q`` [M, K] ``torch.float8_e4m3fn``,
    x / s rounded to E4M3. Checked against ``dsv3lite.fp8.act_quant`` on activations with an
    all-zero tile, an outlier and a negative extreme. Codes must be the same bytes, except that
    up to 1% may differ by one rounding step (x · (1/s) instead of x / s can round the other
    way). Raises ExerciseError saying what is wrong; prints a line when right.
    """
    from ..fp8 import act_quant as package_act_quant

    seed = fresh_seed(seed)
    with seeded(seed):
        x = tricky_activations()
    ref_q, ref_s = package_act_quant(x)
    got = call(act_quant, (x.clone(),), seed, HINT)
    if not isinstance(got, tuple | list) or len(got) != 2:
        raise ExerciseError(
            f"expected a pair (q, s), got {type(got).__name__}", hint="return q, s", seed=seed
        )
    q, s = got
    check_scales(as_tensor(s, "s", seed), x, ref_s, seed, "s")
    if not isinstance(q, torch.Tensor) or q.dtype != FP8:
        got_dtype = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise ExerciseError(
            f"q has dtype {got_dtype}; the codes must be torch.float8_e4m3fn (E4M3)",
            hint="q = (x / s_expanded).to(torch.float8_e4m3fn)",
            seed=seed,
        )
    expect_shape(q, tuple(x.shape), "q", seed, HINT)
    zero = _tiles(x).abs().amax(-1) == 0
    if torch.isnan(_tiles(q.float())[zero]).any():
        raise ExerciseError(
            "q is NaN in the all-zero tile: its scale must have been 0 when you divided",
            hint=ZERO_TILE_HINT,
            seed=seed,
        )
    codes, ref_codes = q.view(torch.uint8).short(), ref_q.view(torch.uint8).short()
    differ = codes != ref_codes
    if not differ.any():
        passed("1×128 scales and E4M3 codes are act_quant's, zero tile and outlier included")
        return
    s_full = ref_s.repeat_interleave(BLOCK, dim=1)
    diagnose(
        q.float(),
        [
            (
                x.clamp(-FP8_MAX, FP8_MAX).to(FP8).float(),
                "q is x cast as it is: divide by the tile's scale first, q = x / s",
                HINT,
            ),
            (
                (x * s_full).clamp(-FP8_MAX, FP8_MAX).to(FP8).float(),
                "q = x · s; the convention x ≈ q · s means q = x / s",
                HINT,
            ),
        ],
        1e-6,
        seed,
    )
    # one rounding step: adjacent codes of the same sign (E4M3 codes are ordered by magnitude)
    one_step = ((codes - ref_codes).abs() == 1) & ((codes ^ ref_codes) & 0x80 == 0)
    if bool((one_step | ~differ).all()) and differ.float().mean() <= 0.01:
        passed(
            "1×128 scales and E4M3 codes match act_quant's (a few codes one rounding step "
            "away: multiplying by 1/s rounds differently from dividing by s — fine)"
        )
        return
    r, c = differ.nonzero()[0].tolist()
    raise ExerciseError(
        f"{int(differ.sum())} of {x.numel()} codes differ from act_quant's; the first at "
        f"[{r}, {c}]: x = {x[r, c].item():.6g}, your code means {q[r, c].float().item():.6g}, "
        f"expected {ref_q[r, c].float().item():.6g}",
        hint=HINT,
        seed=seed,
    )
