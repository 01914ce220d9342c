"""The diagrams of notebooks 02 and 03: a Figure, legible text, labels drawn from the config."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from dsv3lite import ModelConfig, preset  # noqa: E402
from dsv3lite.viz import moe_figure, mtp_figure, style  # noqa: E402


def _texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


def _words(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in _texts(fig))


@pytest.fixture(autouse=True)
def _styled():
    style()
    yield
    plt.close("all")


@pytest.mark.parametrize("draw", [moe_figure, mtp_figure])
def test_a_legible_figure(draw):
    fig = draw()
    assert isinstance(fig, Figure)
    small = [(t.get_text(), t.get_fontsize()) for t in _texts(fig) if t.get_fontsize() < 9]
    assert not small, f"text under 9 pt: {small}"
    fig.canvas.draw()  # lays out without error


def test_moe_figure_shows_the_config():
    tiny = _words(moe_figure(preset("tiny")))
    assert "16 routed experts" in tiny and "n_group = 4" in tiny and "topk_group = 2" in tiny
    assert "$K_r$ = 4" in tiny and "1 shared expert" in tiny
    v3 = _words(moe_figure(ModelConfig()))  # DeepSeek-V3: 256 experts, 8 groups, keep 4, K_r 8
    assert "256 routed experts" in v3 and "n_group = 8" in v3 and "topk_group = 4" in v3
    assert "$K_r$ = 8" in v3 and "of 32" in v3 and "× 2.5" in v3
    assert "16 routed experts" not in v3
    two = _words(moe_figure(preset("tiny", n_shared_experts=2)))
    assert "2 shared experts" in two


def test_mtp_figure_shows_the_config_and_depth():
    one = _words(mtp_figure(preset("tiny")))
    assert "D = 1 MTP module" in one and "4 blocks" in one and "hidden size 128" in one
    assert "MTP module 1" in one and "MTP module 2" not in one
    three = _words(mtp_figure(preset("tiny", num_hidden_layers=6), depth=3))
    assert "D = 3 MTP modules" in three and "6 blocks" in three
    assert "MTP module 3" in three and "$t_{i+4}$" in three  # the last module predicts t_{i+4}
    with pytest.raises(ValueError, match="depth"):
        mtp_figure(depth=0)


def test_a_box_is_centred_on_its_position():
    from matplotlib.colors import to_hex

    from dsv3lite.viz.diagram import BLUE, box, canvas, tint

    fig, ax = canvas(4, 3, (0, 4), (0, 3))
    patch = box(ax, 2.0, 1.5, 1.0, 0.6, "x", 0.15, edge=BLUE, size=7, dashed=True)
    bb = patch.get_bbox()  # the box before its rounding pad
    assert (bb.x0 + bb.x1) / 2 == pytest.approx(2.0) and (bb.y0 + bb.y1) / 2 == pytest.approx(1.5)
    assert (bb.width, bb.height) == pytest.approx((1.0, 0.6))
    assert to_hex(patch.get_facecolor()) == to_hex(tint(BLUE, 0.15)), "a number tints the edge"
    assert patch.get_linestyle() == "--"
    assert ax.texts[0].get_fontsize() == 9, "never under 9 pt"
    assert tint("#000000", 0.0) == (1.0, 1.0, 1.0) and tint("#000000", 1.0) == (0.0, 0.0, 0.0)
