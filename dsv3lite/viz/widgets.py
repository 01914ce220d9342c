"""The course's widgets: sliders over a figure, that still read where no kernel runs.

A saved notebook is read on the web, where a widget cannot draw (there is no kernel to talk
to): what shows there is the widget's plain-text view, by default a raw repr such as
``FloatLogSlider(value=0.01, ...)``. So every widget of the course is shown with

* a sentence as its text view (``show_widget``), and
* its figure drawn once, statically, when the cell runs, as an ordinary output (``explorer``):
  the saved notebook keeps that picture; a running kernel redraws it in place.
"""

from __future__ import annotations

from collections.abc import Callable


def show_widget(widget, fallback: str) -> None:
    """Display ``widget``; where no kernel runs (a notebook read on the web), ``fallback`` is
    what shows instead of the widget's raw repr."""
    from IPython.display import display

    bundle = widget._repr_mimebundle_()
    bundle["text/plain"] = fallback
    display(bundle, raw=True)


def _views(drawn) -> tuple:
    """What ``draw`` returned, as a tuple of things to display; its figures closed, so that
    only the display handles show them (not the inline backend too, at the end of the cell)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    views = drawn if isinstance(drawn, tuple) else (drawn,)
    for view in views:
        if isinstance(view, Figure):
            plt.close(view)
    return views


def explorer(
    draw: Callable[..., object], controls: dict, fallback: str | None = None, *, per_row: int = 3
) -> None:
    """Sliders over ``draw``: the figure ``draw(**values)`` is drawn below them when the cell
    runs and redrawn in place when a slider is released.

    ``controls`` maps ``draw``'s keyword arguments to ipywidgets sliders (``per_row`` to a row).
    ``draw`` returns a Figure, or a tuple of things to display (a figure and a line of text).
    Every slider gets ``continuous_update=False``: dragging does not queue a redraw for each
    value passed over, one redraw happens on release. The first view is an ordinary output, so
    a saved notebook shows it; ``fallback`` (by default: the sliders and their values) is what
    the saved notebook shows in place of the sliders. Displays everything; returns nothing.
    """
    import ipywidgets as widgets
    from IPython.display import display

    items = list(controls.values())
    for w in items:
        w.continuous_update = False
    if fallback is None:
        shown = ", ".join(f"{w.description or k} = {w.value}" for k, w in controls.items())
        fallback = f"[sliders, live when the notebook runs; the figure below: {shown}]"
    rows = [widgets.HBox(items[i : i + per_row]) for i in range(0, len(items), per_row)]
    show_widget(rows[0] if len(rows) == 1 else widgets.VBox(rows), fallback)

    def values() -> dict:
        return {k: w.value for k, w in controls.items()}

    handles = [display(v, display_id=True) for v in _views(draw(**values()))]

    def redraw(_change) -> None:
        for handle, view in zip(handles, _views(draw(**values()))):
            if handle is None:  # no IPython (a plain script, a test): nothing to update
                display(view)
            else:
                handle.update(view)

    for w in items:
        w.observe(redraw, names="value")
