"""The pictures of notebooks 04 and 05 (dsv3lite/viz/fp8.py): each returns a Figure whose text
is legible (≥ 9 pt), and what the diagrams label comes from the package, not typed twice."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import dsv3lite.results  # noqa: E402
from dsv3lite import viz  # noqa: E402
from dsv3lite.fp8 import numerics as nm  # noqa: E402
from dsv3lite.fp8 import quant  # noqa: E402
from dsv3lite.viz import fp8 as plots  # noqa: E402

MIN_PT = 9


@pytest.fixture(autouse=True)
def course_style():
    viz.style()
    yield
    plt.close("all")


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _legible(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    fig.canvas.draw()  # tick labels exist once drawn
    small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < MIN_PT]
    assert not small, f"text under {MIN_PT} pt: {small}"


def _all_text(fig: Figure) -> str:
    fig.canvas.draw()
    return "\n".join(t.get_text() for t in _texts(fig))


def _figures():
    x, outliers = nm.outlier_activations(256, 256, n_outliers=2)
    ordinary = torch.ones(256, dtype=torch.bool)
    ordinary[outliers] = False
    formats = nm.fp8_formats()
    grid = {
        name: torch.arange(256, dtype=torch.uint8).view(dtype).float()
        for name, dtype in (("e4m3", nm.E4M3), ("e5m2", nm.E5M2))
    }
    grid = {n: v[(v > 0) & v.isfinite()].sort().values for n, v in grid.items()}
    errors = {g: nm.quant_error(x, g) for g in nm.GRANULARITIES}

    def dot_errors(k, n_c, trials=200):
        return torch.rand(trials) * (1e-3 if n_c else 1e-2)

    ks = [256, 512, 1024]
    yield "flow", viz.fp8_flow_figure
    yield "tiles", viz.fp8_tiles_figure
    yield "order", lambda: plots.program_order_figure((1, 8), m_tiles=16, n_tiles=12)
    yield "grid", lambda: plots.fp8_grid_figure(grid, formats)
    yield (
        "hist",
        lambda: plots.code_histogram(x, ordinary, errors, formats["e4m3"], nm.GRANULARITIES),
    )
    yield "bars", lambda: plots.granularity_bars({"a": errors, "b": errors}, list(errors), 0.026)
    yield (
        "curves",
        lambda: plots.accumulation_curves(ks, {"x": [1e-3, 2e-3, 4e-3]}, (512, 2e-3, "r")),
    )
    yield (
        "tradeoff",
        lambda: plots.accumulation_tradeoff_figure(dot_errors, 128, 512, ks, [32, 128], [1e-2] * 3),
    )
    steps = list(range(1, 5))
    loss = {"full": torch.tensor([4.0, 3, 2, 1]), "fp8": torch.tensor([4.0, 3, 2, 1.01])}
    gap = (loss["fp8"] - loss["full"]) / loss["full"]
    yield (
        "loss",
        lambda: plots.loss_gap_figure(steps, loss, {"full": 1, "fp8": 1}, gap, "fp32", 0.25),
    )
    yield "groupings", plots.groupings_figure
    deq = x + 0.01
    yield "outlier", lambda: plots.outlier_tile_figure(x, deq, torch.ones(256), split=128)
    yield "bench", lambda: plots.benchmark_figure(dsv3lite.results.load("fp8", "nvidia-h200"))


@pytest.mark.parametrize("name, draw", list(_figures()), ids=[n for n, _ in _figures()])
def test_figures_are_figures_with_legible_text(name, draw):
    _legible(draw())


def test_tile_figure_labels_come_from_the_package(monkeypatch):
    text = _all_text(viz.fp8_tiles_figure())
    block = quant.BLOCK
    assert f"N_C = {block}" in text and f"1×{block}" in text and f"{block}×{block}" in text
    # a package with another group size gets another picture: nothing is typed in twice
    monkeypatch.setattr(quant, "BLOCK", 64)
    text = _all_text(viz.fp8_tiles_figure())
    assert "N_C = 64" in text and "1×64" in text and "64×64" in text
    assert f"N_C = {block}" not in text and f"1×{block}" not in text
    assert f"{64 // plots.WGMMA_K} MMAs" in text  # 64 elements of K: two K = 32 WGMMAs


def test_flow_figure_names_every_gemm_and_precision():
    text = _all_text(viz.fp8_flow_figure())
    for word in ("Fprop", "Dgrad", "Wgrad", "master weight", "cached", "FP8", "BF16", "FP32"):
        assert word in text, word


def _kernel_order(m_tiles: int, n_tiles: int, group_m: int) -> np.ndarray:
    """The GEMM kernel's first lines (dsv3lite/kernels/fp8_gemm.py), one program id at a time."""
    order = np.full((m_tiles, n_tiles), -1)
    for pid in range(m_tiles * n_tiles):
        group_size = group_m * n_tiles
        first_m = (pid // group_size) * group_m
        rows_in_group = min(m_tiles - first_m, group_m)
        order[first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group] = (
            pid
        )
    return order


@pytest.mark.parametrize("shape", [(64, 56), (13, 7), (5, 9)])
@pytest.mark.parametrize("group_m", [1, 4, 8])
def test_launch_order_is_the_kernels(shape, group_m):
    order = plots.launch_order(*shape, group_m)
    assert np.array_equal(order, _kernel_order(*shape, group_m))
    assert sorted(order.flatten()) == list(range(shape[0] * shape[1]))  # every tile once


def test_grouping_reads_fewer_tiles_per_wave():
    flat, grouped = (plots.wave_reads(plots.launch_order(64, 56, g)) for g in (1, 8))
    assert flat == (3, 56)  # 132 programs: two whole rows of 56 tiles and 20 of the third
    assert grouped == (8, 17)  # 132 = 16 columns of 8, and 4 of the 17th
    assert sum(grouped) < sum(flat) / 2
    text = _all_text(plots.program_order_figure((1, 8)))
    assert "= 59 tiles" in text and "= 25 tiles" in text
