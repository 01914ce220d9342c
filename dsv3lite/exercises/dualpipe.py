"""Exercises of notebook 07: Table 2's bubbles, and one rank's 1F1B schedule (report §3.2.1)."""

from __future__ import annotations

import random
from collections.abc import Callable

from ..parallel.schedules import schedule, simulate, table2
from ._check import ExerciseError, call, exercise, fresh_seed, passed

BUBBLE_HINT = (
    "Table 2: 1F1B (PP−1)(F+B); ZB1P (PP−1)(F+B−2W); DualPipe (PP/2−1)(F&B+B−3W), where F&B "
    "is the time of an overlapped forward-and-backward pair (the FB argument)"
)
ONE_F_ONE_B_HINT = (
    "warm-up: rank r runs w = min(pp−1−r, m) forwards; steady state: for i from w to m−1, "
    "F{i} then B{i−w}; cool-down: the backwards left, B{m−w} … B{m−1}"
)
KINDS = ("1f1b", "zb1p", "dualpipe")


@exercise
def check_pipeline_bubble(pipeline_bubble: Callable, *, seed: int | None = None) -> None:
    """Check ``pipeline_bubble(kind, pp, F, B, W, FB) -> float``, Table 2's bubble column.

    ``kind`` is '1f1b', 'zb1p' or 'dualpipe'; ``pp`` the pipeline stages (even); ``F``, ``B``
    the times of a chunk's forward and full backward, ``W`` the weight-gradient part of B, and
    ``FB`` the time of an overlapped forward-and-backward pair (DualPipe's F&B). Checked against
    ``dsv3lite.parallel.schedules.table2`` on random durations, and the answer compared with
    the simulator's bubble for DualPipe on Figure 5's proportions. Raises ExerciseError saying
    what is wrong; prints a line when right.
    """
    seed = fresh_seed(seed)
    rng = random.Random(seed)
    for _ in range(6):
        for kind in KINDS:
            pp = rng.choice((4, 6, 8, 16))
            f = round(rng.uniform(0.5, 2.0), 2)
            b = round(rng.uniform(1.0, 3.0), 2)
            w = round(rng.uniform(0.1, 0.9) * b, 2)
            fb = round(rng.uniform(b, f + b), 2)
            args = (kind, pp, f, b, w, fb)
            ref = table2(kind, pp, f, b, w, fb)["bubble"]
            answer = call(pipeline_bubble, args, seed, BUBBLE_HINT)
            try:
                got = float(answer)
            except (TypeError, ValueError) as err:
                raise ExerciseError(
                    f"expected a number, got {type(answer).__name__}", hint=BUBBLE_HINT, seed=seed
                ) from err
            if abs(got - ref) <= 1e-9 * max(1.0, abs(ref)):
                continue
            raise ExerciseError(
                _bubble_mistake(got, ref, *args) + f" (kind={kind!r}, pp={pp}, F={f}, B={b}, "
                f"W={w}, FB={fb}: expected {ref:g}, got {got:g})",
                hint=BUBBLE_HINT,
                seed=seed,
            )
    sim = simulate("dualpipe", 8, 20, F=1.0, B=2.0, W=1.0, FB=2.5)
    passed(
        "Table 2's bubbles for 1F1B, ZB1P and DualPipe; and the simulator agrees: DualPipe at "
        f"PP=8, F=1, B=2, W=1, F&B=2.5 idles {sim.bubble:g}, as your formula says "
        f"({pipeline_bubble('dualpipe', 8, 1.0, 2.0, 1.0, 2.5):g})"
    )


def _bubble_mistake(got: float, ref: float, kind, pp, f, b, w, fb) -> str:
    """The usual wrong bubble formulas, named."""

    def same(x: float) -> bool:
        return abs(got - x) <= 1e-9 * max(1.0, abs(x))

    if kind == "1f1b":
        if same(pp * (f + b)):
            return "1F1B: the factor is PP−1, not PP (the first stage's own work is no bubble)"
        if same((pp - 1) * f) or same((pp - 1) * b):
            return "1F1B: the pipeline fills with forwards and drains with backwards: F + B"
    if kind == "zb1p":
        if same((pp - 1) * (f + b)):
            return "ZB1P: that is 1F1B's bubble; splitting B lets weight passes fill 2W of it"
        if same((pp - 1) * (f + b - w)):
            return "ZB1P: weight passes fill 2W of each stage's bubble, not W"
    if kind == "dualpipe":
        if same((pp - 1) * (fb + b - 3 * w)):
            return (
                "DualPipe: the factor is PP/2−1, not PP−1 — micro-batches enter from both "
                "ends, so each direction fills only half the pipeline"
            )
        if same((pp / 2 - 1) * (f + b + b - 3 * w)):
            return "DualPipe: the first term is F&B (the FB argument), not F+B"
        if same((pp / 2 - 1) * (fb + b - 2 * w)) or same((pp / 2 - 1) * (fb + b)):
            return "DualPipe: Table 2 subtracts 3W"
    return f"{kind}: that is not Table 2's bubble"


@exercise
def check_one_f_one_b(one_f_one_b: Callable, *, seed: int | None = None) -> None:
    """Check ``one_f_one_b(pp, rank, micro_batches) -> list of ops`` for one rank of 1F1B.

    The answer lists, in order, the ops the rank runs, as strings like 'F0', 'B3' (forward /
    backward of micro-batch 0 / 3) or as ``dsv3lite.parallel.schedules.Op``. Checked against
    ``schedule('1f1b', pp, micro_batches)[rank]`` on several ranks and sizes, fewer
    micro-batches than stages included. Raises ExerciseError saying what is wrong (the warm-up
    length, a backward before its forward, the first op that differs); prints a line when right.
    """
    seed = fresh_seed(seed)
    rng = random.Random(seed)
    cases = [(4, 0, 8), (4, 3, 8), (4, 1, 2)]
    cases += [(pp, rng.randrange(pp), rng.randrange(pp, 3 * pp)) for pp in (6, 8)]
    for pp, rank, m in cases:
        ref = [str(op) for op in schedule("1f1b", pp, m)[rank]]
        got = call(one_f_one_b, (pp, rank, m), seed, ONE_F_ONE_B_HINT)
        try:
            got = [str(op) for op in got]
        except TypeError as err:
            raise ExerciseError(
                f"expected a list of ops, got {type(got).__name__}",
                hint="return a list such as ['F0', 'F1', 'B0', ...]",
                seed=seed,
            ) from err
        if got == ref:
            continue
        where = f" (pp={pp}, rank={rank}, micro_batches={m})"
        expected = sorted(f"{p}{i}" for p in "FB" for i in range(m))
        if sorted(got) != expected:
            message = f"each micro-batch needs exactly one F and one B; your ops: {got}"
        elif any(got.index(f"B{i}") < got.index(f"F{i}") for i in range(m)):
            i = next(i for i in range(m) if got.index(f"B{i}") < got.index(f"F{i}"))
            message = f"B{i} runs before F{i}: a backward needs its forward's activations"
        elif _warmup(got) != _warmup(ref):
            message = (
                f"rank {rank} of {pp} should run {_warmup(ref)} forwards before its first "
                f"backward, you run {_warmup(got)}: pp−1−rank = {pp - 1 - rank} of warm-up "
                "(capped by the micro-batches), then the steady state opens with one more F"
            )
        else:
            i = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
            message = f"op #{i} is {got[i]}, expected {ref[i]}: expected {ref}, got {got}"
        raise ExerciseError(message + where, hint=ONE_F_ONE_B_HINT, seed=seed)
    passed(f"1F1B schedules match dsv3lite.parallel.schedules on all {len(cases)} ranks tried")


def _warmup(ops: list[str]) -> int:
    """Forwards before the first backward."""
    return next((i for i, op in enumerate(ops) if op.startswith("B")), len(ops))
