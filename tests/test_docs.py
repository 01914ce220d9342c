"""``python -m dsv3lite docs``: the static site loads nothing from the network.

A page counts as offline when no tag that loads a resource (script, link, img, iframe, ...) points
at http(s), no CSS pulls a remote url() or @import, and no script is MathJax or require.js.
Links a reader may click (an anchor to arxiv.org in the prose) are fine.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from dsv3lite.__main__ import main
from dsv3lite.docs import WIDGET_VIEW, build

ROOT = Path(__file__).resolve().parents[1]
LOADING_TAGS = {"script", "link", "img", "iframe", "source", "video", "audio", "embed", "object"}
REMOTE = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)


class Resources(HTMLParser):
    """Collects what a page would load: resource URLs, script texts, and anchors' hrefs."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self.anchors: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag in LOADING_TAGS:
            self.urls += [values[a] for a in ("src", "href", "data") if a in values]
        if tag == "a" and "href" in values:
            self.anchors.append(values["href"])
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def assert_offline(page: Path) -> Resources:
    """Fail with the offending URL if ``page`` would load anything from the network."""
    text = page.read_text(encoding="utf-8")
    found = Resources()
    found.feed(text)
    remote = [url for url in found.urls if REMOTE.match(url)]
    assert not remote, f"{page.name} loads {remote}"
    css = re.findall(r"url\(\s*['\"]?(?:https?:)?//[^)]*|@import[^;]*", text, re.IGNORECASE)
    assert not css, f"{page.name}: CSS loads {css[:3]}"
    loaders = [s[:80] for s in found.scripts if re.search(r"mathjax|require", s, re.IGNORECASE)]
    assert not loaders, f"{page.name} runs {loaders}"
    return found


def write_notebooks(folder: Path) -> None:
    """Two small notebooks: equations and a saved widget in one, plain markdown in the other."""
    v4 = nbformat.v4
    widget = v4.new_code_cell(
        "interact(f, x=(0, 10))",
        outputs=[
            v4.new_output(
                "display_data",
                data={
                    WIDGET_VIEW: {"model_id": "abc", "version_major": 2},
                    "text/plain": "IntSlider()",
                },
            ),
            v4.new_output("stream", text="x = 5 gives 25\n"),
        ],
    )
    maths = v4.new_notebook(
        cells=[
            v4.new_markdown_cell(
                "# 00 · Equations\n\nThe gate $s_{i,t} = \\operatorname{Sigmoid}(u_t^\\top e_i)$, "
                "weights \\\\(\\mathbf{W} \\times \\frac{1}{\\sqrt{d}}\\\\), and `echo $HOME` in code; "
                "see [the report](https://arxiv.org/abs/2412.19437).\n\n"
                "$$\\sum_{i=1}^{N} g_{i,t} \\cdot \\text{FFN}_i(u_t)$$\n\n"
                "An unknown command: $\\notacommand{x}$."
            ),
            widget,
        ],
        metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}},
    )
    plain = v4.new_notebook(cells=[v4.new_markdown_cell("# 01 · Plain\n\nNo maths here.")])
    nbformat.write(maths, folder / "00_maths.ipynb")
    nbformat.write(plain, folder / "01_plain.ipynb")


def test_small_site_is_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_notebooks(tmp_path)
    site = tmp_path / "site"
    assert main(["docs", "--notebooks", str(tmp_path), "--out", str(site)]) == 0
    assert "3 equations as MathML, 1 left as TeX" in capsys.readouterr().out

    page = site / "00_maths.html"
    found = assert_offline(page)
    assert not any(s.strip() for s in found.scripts if "widget" in s), "widget state was kept"
    assert "https://arxiv.org/abs/2412.19437" in found.anchors  # a link in prose stays
    text = page.read_text(encoding="utf-8")
    assert text.count("<math") == 3 and 'display="block"' in text
    assert "<code>echo $HOME</code>" in text  # a dollar in a code span is not maths
    assert '<code class="tex">\\notacommand{x}</code>' in text
    assert text.count("interactive widget: run the notebook to use it") == 1
    assert "x = 5 gives 25" in text and "IntSlider()" not in text
    assert_offline(site / "01_plain.html")
    assert_offline(site / "index.html")


def test_no_notebooks_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["docs", "--notebooks", str(tmp_path), "--out", str(tmp_path / "site")])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_course_site_is_offline(tmp_path: Path) -> None:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    count = build(ROOT / "notebooks", tmp_path)
    assert not count.fallbacks, f"TeX that does not become MathML: {count.fallbacks}"
    assert count.converted > 0
    for nb in notebooks:
        assert_offline(tmp_path / f"{nb.stem}.html")
    index = assert_offline(tmp_path / "index.html")
    assert index.anchors == [f"{nb.stem}.html" for nb in notebooks]
