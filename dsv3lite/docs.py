"""``python -m dsv3lite docs``: the notebooks as a static site that needs no network.

A workshop without network still gets the course as web pages (``make docs``, then open
``site/index.html``). nbconvert's stock pages load MathJax, require.js and the widget manager
from CDNs, so offline their equations show as raw TeX and their widgets are missing. Here:

- equations are converted to MathML at build time (``latex2mathml``); every current browser
  draws MathML by itself, so no script is needed. TeX that does not convert is shown as TeX in a
  ``<code>`` span, and the build counts those fallbacks;
- widget views are replaced by a one-line note (every widget in the notebooks has a static
  figure or printed output beside it), and the saved widget state is dropped;
- the page template leaves out nbconvert's CDN scripts; nbconvert already inlines its CSS, and
  the outputs' images are base64 (tests/test_docs.py scans every page for anything remote).

The notebooks are exported as saved (already executed): nothing runs.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from jinja2 import DictLoader, pass_context
from latex2mathml.converter import convert
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

from .errors import UserInputError

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = '<p class="widget-note"><em>interactive widget: run the notebook to use it</em></p>'

# nbconvert's lab page without the blocks that load scripts from CDNs, and with a math font
# (browsers' default text fonts lack the large operators and stretchy brackets of MathML)
TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block extra_css %}<style>
math { font-family: math, "STIX Two Math", "Cambria Math", "DejaVu Math TeX Gyre", serif; }
</style>{% endblock %}
{% block html_head_js %}{% endblock %}
{% block jupyter_widgets %}{% endblock %}
{% block html_head_js_mathjax %}{% endblock %}
{% block html_head_js_mermaidjs %}{% endblock %}
"""

# latex2mathml passes a command it does not know through as text (``<mi>\\foo</mi>``) and an
# alignment ``&`` through unescaped, and truncates on unbalanced braces without an error: all
# mean the TeX was not understood.
NOT_UNDERSTOOD = re.compile(r">(\\[A-Za-z]+|&)<")


@dataclass
class MathCount:
    """Equations converted on the way, and the TeX of those shown as TeX instead."""

    converted: int = 0
    fallbacks: list[str] = field(default_factory=list)


def tex_to_mathml(tex: str, display: bool, count: MathCount) -> str:
    """MathML for ``tex``, or the TeX itself in a ``<code>`` span when it does not convert."""
    try:
        mathml = convert(tex, display="block" if display else "inline")
    except Exception:  # latex2mathml raises many types (IndexError, its own) on bad input
        mathml = None
    if mathml is None or NOT_UNDERSTOOD.search(mathml) or tex.count("{") != tex.count("}"):
        count.fallbacks.append(tex)
        return f'<code class="tex">{html.escape(tex)}</code>'
    count.converted += 1
    return mathml


class MathMLRenderer(IPythonRenderer):
    """nbconvert's markdown renderer, with math turned into MathML instead of left for MathJax.

    Its parser already tells math from code spans (``$HOME`` in backticks stays code)."""

    def __init__(self, count: MathCount, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.count = count

    def inline_math(self, body: str) -> str:
        return tex_to_mathml(body, display=False, count=self.count)

    def block_math(self, body: str) -> str:
        return tex_to_mathml(body, display=True, count=self.count)

    def latex_environment(self, name: str, body: str) -> str:
        return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", True, self.count)


class OfflineHTMLExporter(HTMLExporter):
    """The lab template's page with MathML equations and no external scripts."""

    def __init__(self, count: MathCount) -> None:
        super().__init__(
            extra_loaders=[DictLoader({"offline.html.j2": TEMPLATE})],
            template_file="offline.html.j2",
            embed_images=True,  # markdown images that point at files become data: URLs
        )
        self.count = count

    @pass_context
    def markdown2html(self, context: dict, source: str) -> str:
        """HTMLExporter.markdown2html with our renderer in place of IPythonRenderer."""
        renderer = MathMLRenderer(
            self.count,
            escape=False,
            attachments=context.get("cell", {}).get("attachments", {}),
            embed_images=self.embed_images,
            path=context.get("resources", {}).get("metadata", {}).get("path", ""),
            anchor_link_text=self.anchor_link_text,
            exclude_anchor_links=self.exclude_anchor_links,
            **self.lexer_options,
        )
        return MarkdownWithMath(renderer=renderer).render(source)


def drop_widgets(nb: nbformat.NotebookNode) -> int:
    """Replace each cell's widget views by one note and drop the saved widget state.

    Returns how many cells had widgets. A view draws only through the widget manager, loaded
    from a CDN, so offline it would be an empty box."""
    nb.metadata.pop("widgets", None)
    cells = 0
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        kept = [out for out in outputs if WIDGET_VIEW not in out.get("data", {})]
        if len(kept) == len(outputs):
            continue
        first = next(i for i, out in enumerate(outputs) if WIDGET_VIEW in out.get("data", {}))
        note = nbformat.v4.new_output("display_data", data={"text/html": WIDGET_NOTE})
        cell.outputs = kept[:first] + [note] + kept[first:]
        cells += 1
    return cells


def title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first line of the first markdown cell, without its ``#``: the notebook's title."""
    first = nb.cells[0] if nb.cells else None
    if first is None or first.cell_type != "markdown" or not first.source.strip():
        return fallback
    return first.source.strip().splitlines()[0].lstrip("# ").strip()


def index_page(titles: dict[str, str]) -> str:
    """The site's front page: the notebooks in course order, each under its title."""
    rows = "".join(
        f'<li><a href="{stem}.html">{html.escape(t)}</a></li>' for stem, t in titles.items()
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>dsv3lite — the course</title>"
        "<h1>dsv3lite — DeepSeek-V3's infrastructure, one notebook at a time</h1>"
        "<p>The notebooks as committed, with their outputs. Run them yourself: see the "
        f"project's README.</p><ul>{rows}</ul>"
    )


def build(notebooks: Path, out: Path) -> MathCount:
    """Export every ``NN_*.ipynb`` in ``notebooks`` to ``out/NN_*.html`` and write the index."""
    paths = sorted(notebooks.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise UserInputError(f"--notebooks {notebooks}: no NN_*.ipynb notebooks there")
    out.mkdir(parents=True, exist_ok=True)
    count = MathCount()
    exporter = OfflineHTMLExporter(count)
    titles, widgets = {}, 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        widgets += drop_widgets(nb)
        titles[path.stem] = title(nb, path.stem)
        resources = {"metadata": {"name": path.stem, "path": str(path.parent)}}
        page, _ = exporter.from_notebook_node(nb, resources=resources)
        (out / f"{path.stem}.html").write_text(page, encoding="utf-8")
    (out / "index.html").write_text(index_page(titles), encoding="utf-8")
    print(
        f"{out}/: index.html and {len(paths)} notebooks; {count.converted} equations as MathML, "
        f"{len(count.fallbacks)} left as TeX; widget note in {widgets} cells"
    )
    for tex in count.fallbacks:
        print(f"  left as TeX: {json.dumps(tex)}")
    return count


def run(args: argparse.Namespace) -> int:
    """``python -m dsv3lite docs --out DIR --notebooks DIR``; 0 even with fallbacks (those
    equations still read, as TeX)."""
    build(Path(args.notebooks), Path(args.out))
    return 0
