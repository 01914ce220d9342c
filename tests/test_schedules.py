"""Schedules and simulator against the report's Table 2: bubbles, parameters and activations
for 1F1B, ZB1P, DualPipe and DualPipeV; every schedule is complete and deadlock-free."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from dsv3lite.parallel.schedules import KINDS, layout, schedule, simulate, table2

PPS = (4, 8, 16)


def micro_batch_counts(kind: str, pp: int) -> list[int]:
    """Table 2's regime: at least PP micro-batches (2·PP for DualPipe, two directions)."""
    low = 2 * pp if kind == "dualpipe" else pp
    return [low, low + 2, 3 * pp, 5 * pp + 2] if kind != "dualpipe" else [low, low + 2, 3 * pp]


# (F, B, W, F&B) inside each formula's domain (see the schedules module docstring)
DURATIONS = {
    "1f1b": [(1, 2, 1, 3), (1.3, 2.9, 0.7, 4.2), (2, 1, 0.5, 3)],
    "zb1p": [(1, 2, 1, 3), (1.3, 2.9, 0.7, 4.2), (1.1, 1.7, 0.6, 2.8)],
    # DualPipe's row is exact when F = B - W and W <= F; F&B anywhere in [B, F+B]
    "dualpipe": [(1, 2, 1, 3), (1, 2, 1, 2.4), (1.5, 2.5, 1, 3.1), (0.8, 1.3, 0.5, 1.6)],
}
DURATIONS["dualpipev"] = DURATIONS["dualpipe"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pp", PPS)
def test_bubble_and_memory_match_table2(kind, pp):
    for m, (F, B, W, FB) in itertools.product(micro_batch_counts(kind, pp), DURATIONS[kind]):
        sim = simulate(kind, pp, m, F, B, W, FB)
        row = table2(kind, pp, F, B, W, FB)
        assert sim.bubble == pytest.approx(row["bubble"], abs=1e-9), (kind, pp, m, F, B, W, FB)
        assert max(sim.parameters) == row["parameters"]
        assert max(sim.activations) == row["activations"], (kind, pp, m, sim.activations)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p"])
def test_one_f_one_b_bubble_is_the_same_on_every_rank(kind):
    sim = simulate(kind, 8, 20, 1.3, 2.9, 0.7)
    assert max(sim.bubbles) - min(sim.bubbles) < 1e-9


def test_table2_formulas_are_the_reports():
    F, B, W, FB = 1.0, 2.0, 1.0, 2.5
    assert table2("1f1b", 8, F, B, W)["bubble"] == 7 * (F + B)
    assert table2("zb1p", 8, F, B, W)["bubble"] == 7 * (F + B - 2 * W)
    assert table2("dualpipe", 8, F, B, W, FB)["bubble"] == 3 * (FB + B - 3 * W)
    assert [table2(k, 8, F, B, W)["parameters"] for k in KINDS] == [1, 1, 2, 2]
    assert [table2(k, 8, F, B, W)["activations"] for k in KINDS] == [8, 8, 9, 9]


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_runs_every_micro_batch_once(kind):
    pp, m = 8, 20
    lay = layout(kind, pp)
    seen = Counter()
    for rank, ops in enumerate(schedule(kind, pp, m)):
        for op in ops:
            for part in op.parts():
                pipe, stage = lay.stage(rank, part.chunk)
                kind_ = {"I": "B"}.get(part.kind, part.kind)
                seen[(kind_, pipe, stage, part.mb)] += 1
    per_pipe = m // lay.pipes
    split = {"zb1p", "dualpipe", "dualpipev"}
    for pipe, stage, mb in itertools.product(range(lay.pipes), range(pp), range(per_pipe)):
        assert seen[("F", pipe, stage, mb)] == 1
        assert seen[("B", pipe, stage, mb)] == 1
        assert seen[("W", pipe, stage, mb)] <= (1 if kind in split else 0)
    assert sum(seen.values()) == sum(seen[k] for k in seen if k[2] < pp)


def test_dualpipe_opens_like_figure5():
    """Device 0 of Figure 5 (PP=8, 20 micro-batches): F0..F6, then three rounds of the reverse
    direction's F, I, W, then F3', then the first overlapped pair F7&B3'."""
    ops = [str(op) for op in schedule("dualpipe", 8, 20)[0]]
    assert ops[:7] == [f"F{i}" for i in range(7)]
    assert ops[7:16] == ["F0'", "I0'", "W0'", "F1'", "I1'", "W1'", "F2'", "I2'", "W2'"]
    assert ops[16:18] == ["F3'", "F7&B3'"]
    sim = simulate("dualpipe", 8, 20, F=1, B=2, W=1, FB=3)
    assert sim.bubbles == [6.0] * 8  # six idle cells per device in Figure 5


def test_dualpipev_uses_half_the_ranks():
    sim = simulate("dualpipev", 8, 20)
    assert len(sim.timelines) == 4 and sim.parameters == [2] * 4


@pytest.mark.parametrize(
    "args, match",
    [
        (("dualpipe", 7, 14), "even number of pipeline stages"),
        (("dualpipev", 5, 10), "even number of pipeline stages"),
        (("dualpipe", 8, 10), "micro_batches >= 16"),
        (("dualpipe", 4, 9), "even count"),
        (("dualpipev", 8, 6), "micro_batches >= 8"),
        (("gpipe", 4, 8), "must be one of"),
        (("1f1b", 0, 8), "positive integer"),
        (("1f1b", 4, 0), "micro_batches >= 1"),
    ],
)
def test_bad_arguments_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        simulate(*args)


def test_bad_durations_are_refused():
    with pytest.raises(ValueError, match="0 <= W < B"):
        simulate("zb1p", 4, 8, F=1, B=1, W=1)
