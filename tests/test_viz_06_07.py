"""The pictures of notebooks 06 and 07: legible, drawn from the package's own schedules, and
cheap to redraw (a few collections, not one artist per op)."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from dsv3lite.parallel.overlap import Interval, plot_timeline  # noqa: E402
from dsv3lite.parallel.schedules import plot_schedule, schedule, simulate  # noqa: E402
from dsv3lite.viz import dualpipe_figure, overlap_figure  # noqa: E402
from dsv3lite.viz.parallel import explore_schedules, sm_figure  # noqa: E402
from dsv3lite.viz.widgets import explorer  # noqa: E402


def _texts(fig: Figure) -> list[Text]:
    fig.savefig(io.BytesIO(), format="png")  # lay it out: what a reader sees
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _legible(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    assert fig.dpi >= 100
    small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < 9]
    assert not small, f"text under 9 pt: {small[:5]}"


def _bars(fig: Figure, gid: str) -> int:
    return sum(
        len(c.get_paths())
        for ax in fig.axes
        for c in ax.collections
        if (c.get_gid() or "").startswith(gid)
    )


def _few_dualpipe_ops():
    return simulate("dualpipe", 4, 8, F=1, B=2, W=1, FB=3)


@pytest.mark.parametrize(
    "draw",
    [
        overlap_figure,
        dualpipe_figure,
        lambda: explore_schedules(4, 8),
        lambda: plot_schedule(_few_dualpipe_ops()),
        lambda: sm_figure(lambda s, b: min(50.0, s * b), lambda s, r, b: 1.0 + r / s)[0],
    ],
    ids=["overlap", "dualpipe", "explore", "schedule", "sm"],
)
def test_figures_are_legible(draw):
    _legible(draw())


@pytest.mark.parametrize("pp, micro_batches", [(8, 20), (4, 10)])
def test_dualpipe_figure_draws_every_op_of_the_schedule(pp, micro_batches):
    fig = dualpipe_figure(pp, micro_batches)
    ops = [op for rank in schedule("dualpipe", pp, micro_batches) for op in rank]
    assert _bars(fig, "ops:frame") == len(ops)  # one frame per op, an F&B pair one frame
    assert _bars(fig, "ops:") - _bars(fig, "ops:frame") == sum(len(op.parts()) for op in ops)
    assert fig.legends, "the legend sits on the figure, outside the axes"


def test_a_crowded_schedule_is_a_few_collections_without_numbers():
    sim = simulate("dualpipe", 16, 64, F=1, B=2, W=1, FB=2.5)
    fig = plot_schedule(sim)
    ax = fig.axes[0]
    assert not ax.patches, "one Rectangle artist per op makes a widget redraw take seconds"
    assert len(ax.collections) <= 9  # one per op kind and chunk, plus the frames
    assert not ax.texts  # thousands of ops: no per-op numbers
    assert _bars(fig, "ops:frame") == sum(len(t) for t in sim.timelines)


def test_a_small_schedule_is_numbered():
    fig = plot_schedule(simulate("1f1b", 4, 8))
    assert {t.get_text() for t in fig.axes[0].texts} == {str(i) for i in range(8)}


def test_overlap_timeline_colours_are_distinct():
    names = ["plan", "shared", "experts", "finish", "layout", "dispatch", "combine"]
    timeline = [
        Interval("compute" if i < 4 else "comm", name, 0, i * 1e-3, (i + 0.8) * 1e-3)
        for i, name in enumerate(names)
    ]
    fig = plot_timeline([timeline, timeline])
    colours = {tuple(c.get_facecolor()[0]) for c in fig.axes[0].collections}
    assert len(colours) == len(names)
    _legible(fig)


def test_explorer_redraws_on_release_only(capsys):
    widgets = pytest.importorskip("ipywidgets")
    slider = widgets.FloatSlider(value=1.0, min=0.5, max=2.0, description="ratio")
    drawn = []
    explorer(lambda ratio: drawn.append(ratio) or Figure(), {"ratio": slider})
    assert slider.continuous_update is False
    assert drawn == [1.0], "the static figure is drawn once when the cell runs"
    slider.value = 1.5
    assert drawn == [1.0, 1.5], "one redraw per released value"
    shown = capsys.readouterr().out
    assert "ratio = 1.0" in shown and "FloatSlider(" not in shown, "a sentence, not a raw repr"
