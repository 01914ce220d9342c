"""dsv3lite.viz.decoding: the speculation diagram and the decoding plots are legible figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from dsv3lite.viz import decoding, speculation_figure, style  # noqa: E402

MIN_PT = 9


def small_text(fig: Figure) -> list[str]:
    """Every non-empty text of ``fig`` under MIN_PT points, as 'text (size pt)'."""
    fig.canvas.draw()  # tick labels exist only once drawn
    return [
        f"{t.get_text()!r} ({t.get_fontsize():.1f} pt)"
        for t in fig.findobj(Text)
        if t.get_text().strip() and t.get_visible() and t.get_fontsize() < MIN_PT
    ]


@pytest.fixture(autouse=True)
def course_style():
    style()
    yield
    plt.close("all")


def test_speculation_figure_is_a_legible_figure():
    fig = speculation_figure()
    assert isinstance(fig, Figure)
    texts = " ".join(t.get_text() for t in fig.findobj(Text))
    for word in ("main model", "MTP module", "accept", "reject"):
        assert word in texts, word
    assert not small_text(fig), small_text(fig)
    assert fig.dpi >= 100


def test_the_plots_are_legible():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    bench = {
        "ceilings": {"copy_gbs": 4000.0, "gemm_tflops": 700.0},
        "rows": [
            {"shape": f"H{h} B{b} L4096", "impl": impl, "tflops": 100.0, "of_copy": 0.5,
             "of_gemm": 0.3}
            for h in (16, 128) for b in (1, 64) for impl in ("ours triton", "eager torch")
        ],
    }  # fmt: skip
    figs = [
        decoding.nucleus_figure(logits, (0.7, 1.0), 0.9, "next token"),
        decoding.mla_bench_figure(bench, {16: 0.8, 128: 0.75}),
        decoding.explore_figure(16, 2, 4096, 64, 4000.0, 700.0)[0],
        decoding.acceptance_figure({"greedy": [0.5, 0.7]}, ["a", "b"], {"line": 0.6}, (0.85, 0.9)),
        decoding.speedup_figure({"shipped": 0.7}),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert not small_text(fig), small_text(fig)


def test_step_costs_bound():
    assert decoding.step_costs(128, 1, 4096, 64, 4249.0, 692.0)["bound"] == "compute-bound"
    assert decoding.step_costs(16, 2, 4096, 64, 4249.0, 692.0)["bound"] == "memory-bound"
