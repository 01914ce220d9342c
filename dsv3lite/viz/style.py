"""One look for every figure of the course: legible on a laptop screen and on the web."""

from __future__ import annotations

import matplotlib as mpl

DPI = 110  # ≥ 100: 9 pt text is then ≥ 14 px tall
RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.constrained_layout.use": True,
}
# distinguishable in colour, in grey print and for the common colour-vision deficiencies
# (Okabe & Ito's palette)
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def style() -> None:
    """Apply the course's matplotlib settings. Importing pyplot first lets Jupyter's inline
    backend load (and set its own dpi) before these settings, and registers the display of a
    returned Figure as a picture."""
    import matplotlib.pyplot  # noqa: F401 - for its side effect: the backend loads

    mpl.rcParams.update(RC)
    mpl.rcParams["axes.prop_cycle"] = mpl.cycler(color=COLORS)


def legend_outside(ax, **kwargs):
    """A legend to the right of the axes, never over the data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)
