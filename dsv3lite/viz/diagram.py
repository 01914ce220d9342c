"""The drawing primitives every diagram of ``dsv3lite.viz`` is made of: a sheet (``canvas``),
boxes, arrows, routed connections, the sum node of a residual, and light fills.

One set, one convention, so that the pictures of the course read alike and a learner who opens
one diagram's code can read them all:

* positions are **data coordinates** of a frameless axes (``canvas``), so a layout reads as a
  grid of numbers and the picture scales with the figure;
* a box is given by its **centre** (x, y) and its size w × h — arrows then meet boxes at
  ``x ± w/2`` or ``y ± h/2``, which is easy to read off the call;
* text is never under 9 pt (the course's smallest legible size at ≥ 100 dpi).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from .style import COLORS, DPI

MIN_PT = 9  # the smallest text on any diagram
FONT = 10  # pt: a box's text unless told
INK = "#333333"  # edges, arrows and lines unless told
BLUE, ORANGE, GREEN, RED, PINK, SKY = COLORS[:6]
GREY = "#999999"
# light fills for the parts of the model, each a tint of the palette colour it stands for
FILL = {
    "attention": "#CFE3F2",  # light blue (COLORS[0])
    "moe": "#FBE3B8",  # light orange (COLORS[1])
    "norm": "#E2E2E2",
    "io": "#FFFFFF",
    "cache": "#F6C9A8",  # light vermilion (COLORS[3]): what is kept between decode steps
    "shared": "#C9EBDD",  # light green (COLORS[2])
}


def tint(color, amount: float) -> tuple[float, float, float]:
    """``color`` mixed with white: ``amount`` of the colour (0: white, 1: the colour itself).
    A box filled with a tint of its edge colour is grouped by colour, yet black text on it
    stays legible."""
    return tuple(1 - amount * (1 - c) for c in to_rgb(color))


def canvas(width: float, height: float, xlim: tuple, ylim: tuple, *, equal: bool = True):
    """A figure of ``width`` × ``height`` inches with one frameless axes spanning the data
    coordinates ``xlim`` × ``ylim``: the sheet a diagram is drawn on. ``equal`` keeps one data
    unit as long in x as in y (circles stay round); without it the axes fill the figure and a
    unit is as long as the figure's shape makes it. Returns (figure, axes)."""
    fig = plt.figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set(xlim=xlim, ylim=ylim)
    ax.set_aspect("equal" if equal else "auto")
    ax.axis("off")
    return fig, ax


def box(
    ax,
    x: float,
    y: float,
    w: float,
    h: float,
    text: str = "",
    fill="#FFFFFF",
    *,
    edge: str = INK,
    size: float = FONT,
    lw: float = 1.2,
    dashed: bool = False,
    **text_kw,
) -> FancyBboxPatch:
    """A rounded box **centred** on (x, y), ``w`` × ``h`` in data units, with centred text: one
    block of a diagram.

    ``fill`` is a colour, or a number: that much of the ``edge`` colour mixed with white
    (``tint``), the usual way to colour a block while its text stays black. ``dashed`` draws
    the edge in dashes (something drawn around other boxes, or not always there). ``size`` is
    the text's size in points, never under 9; other keywords go to the text (``weight="bold"``).
    """
    patch = FancyBboxPatch(
        (x - w / 2, y - h / 2),
        w,
        h,
        boxstyle="round,pad=0.02,rounding_size=0.12",
        facecolor=tint(edge, fill) if isinstance(fill, (int, float)) else fill,
        edgecolor=edge,
        linewidth=lw,
        linestyle="--" if dashed else "-",
    )
    ax.add_patch(patch)
    if text:
        ax.text(x, y, text, ha="center", va="center", fontsize=max(size, MIN_PT), **text_kw)
    return patch


def arrow(
    ax,
    start: tuple[float, float],
    end: tuple[float, float],
    text: str = "",
    *,
    color: str = INK,
    lw: float = 1.2,
    rad: float = 0.0,
    dashed: bool = False,
    style: str = "-|>",
    shrink: float = 2.0,
    size: float = 9.5,
    offset: tuple[float, float] = (0.12, 0.0),
    ha: str = "left",
) -> FancyArrowPatch:
    """An arrow from ``start`` to ``end`` (data coordinates): data flowing from one block to
    the next.

    ``text`` labels it beside its middle, moved by ``offset`` (data units) and aligned by
    ``ha`` — the weight matrix it applies, in the report's notation. ``rad`` bends it (the
    curvature of an arc; 0 is straight), ``style`` is matplotlib's arrow style (``"<|-|>"``: a
    span), ``shrink`` stops it that many points short of both ends so it does not bite into a
    box's edge."""
    patch = FancyArrowPatch(
        start,
        end,
        arrowstyle=style,
        mutation_scale=12,
        color=color,
        linewidth=lw,
        linestyle="--" if dashed else "-",
        shrinkA=shrink,
        shrinkB=shrink,
        connectionstyle=f"arc3,rad={rad}",
    )
    ax.add_patch(patch)
    if text:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, text, ha=ha, va="center", fontsize=max(size, MIN_PT), color=color)
    return patch


def path(ax, points, color: str = INK, *, lw: float = 1.2) -> None:
    """A line through ``points`` (give them with right angles: each step changes x or y), its
    last segment an arrow: a connection routed around the boxes instead of across them, such
    as a residual or a shared expert's bypass."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=color, lw=lw, solid_capstyle="butt")
    arrow(ax, points[-2], points[-1], color=color, lw=lw, shrink=0)


def plus(ax, x: float, y: float, r: float = 0.28, *, size: float = 12, lw: float = 1.2) -> Circle:
    """The circled "+" where branches are summed (a residual add, the MoE output). On a
    ``canvas`` without ``equal`` aspect the circle is as round as the figure's shape allows."""
    node = Circle((x, y), r, facecolor="white", edgecolor=INK, linewidth=lw)
    ax.add_patch(node)
    ax.text(x, y, "+", ha="center", va="center", fontsize=max(size, MIN_PT))
    return node
