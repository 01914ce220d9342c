"""The course as a classroom reads it, checked on the committed notebooks (no kernel runs).

* Prose never contradicts its output: every measured number in a markdown cell (a ratio ×, a
  percentage, a time, a rate, a size) is one the notebook printed (rounded to the digits the
  prose gives) or asserted, or a figure quoted from the DeepSeek-V3 report, listed in the
  notebook's metadata ``dsv3lite.report_figures`` and said to be the report's in its cell.
* No wall of code: no code cell over 30 lines.
* Every figure at ≥ 100 dpi (the PNG's own resolution chunk, as matplotlib writes it).
* Nothing outside the repository is cited.
* Exercises are the student's: no notebook runs a reference solution, and the saved output of
  each check shows the exercise still open (the solutions notebook runs them instead).
* Every idea has its picture: each diagram of ``dsv3lite.viz`` is drawn in its notebook.
"""

from __future__ import annotations

import json
import re
import struct
from base64 import b64decode
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
STUDENT = [nb for nb in NOTEBOOKS if nb.stem != "solutions"]
MAX_LINES = 30
MIN_DPI = 100

# where each diagram of dsv3lite.viz is drawn
DIAGRAMS = {
    "00_tour": ["architecture_figure"],
    "01_mla": ["mla_figure"],
    "02_moe_routing": ["moe_figure"],
    "03_mtp": ["mtp_figure"],
    "04_fp8_numerics": ["fp8_flow_figure", "fp8_tiles_figure"],
    "06_expert_parallel": ["overlap_figure"],
    "07_dualpipe": ["dualpipe_figure"],
    "10_speculation": ["speculation_figure"],
}

UNIT = (
    r"(?:×(?!\s?\d)|x\b(?!\s?\d)|%|\s?(?:ms|µs|us|s|min|GB/s|TB/s|TFLOP/s|tokens/s|tok/s|MB|GB|"
    r"GiB|MiB|KiB)\b|M-parameter|\s?M parameters|\s?B parameters)"
)
NUMBER = r"\d[\d,]*(?:\.\d+)?"
MEASURED = re.compile(rf"(?<![\w.§/×-])({NUMBER}(?:\s?[–-]\s?{NUMBER})?){UNIT}")
ANY_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _output_texts(cell: dict) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            texts.append("".join(out["text"]))
        for kind in ("text/plain", "text/markdown", "text/html", "text/latex"):
            if kind in out.get("data", {}):
                texts.append("".join(out["data"][kind]))
    return texts


def _values(text: str) -> list[float]:
    values = []
    for m in ANY_NUMBER.finditer(text):
        try:
            values.append(float(m.group(0).replace(",", "")))
        except ValueError:
            pass
    return values


def _matches(token: str, values: list[float]) -> bool:
    """A number as the prose writes it equals a printed value rounded to the prose's digits."""
    digits = len(token.split(".")[1]) if "." in token else 0
    v = float(token.replace(",", ""))
    for w in values:
        for scaled in (w, w * 100):  # a fraction printed, a percentage written
            if round(scaled, digits) == v or (digits == 0 and abs(scaled - v) < 0.5):
                return True
    return False


def _unmatched_numbers(nb: dict) -> list[str]:
    printed: list[float] = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            for text in _output_texts(cell):
                printed += _values(text)
            for line in _source(cell).splitlines():  # asserted ranges count as output
                if line.strip().startswith("assert"):
                    printed += _values(line)
    quoted = nb["metadata"].get("dsv3lite", {}).get("report_figures", [])
    bad = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = _source(cell)
        for m in MEASURED.finditer(text):
            if m.group(0) in quoted or m.group(0).replace(" ", "") in quoted:
                if "report" not in text.lower():
                    bad.append(
                        f"cell {i}: {m.group(0)!r} is a report figure, but the cell never says so"
                    )
                continue
            ends = re.split(r"\s?[–-]\s?", m.group(1))
            if not all(_matches(end, printed) for end in ends):
                bad.append(f"cell {i}: {m.group(0)!r}")
    return bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_numbers_come_from_the_output(path):
    bad = _unmatched_numbers(_load(path))
    assert not bad, (
        "measured numbers in the prose that no output of the notebook prints (format them "
        "into an output, assert their range, or list a quoted report figure in the metadata "
        "dsv3lite.report_figures):\n" + "\n".join(bad)
    )


def test_the_prose_check_catches_a_contradiction():
    nb = {
        "metadata": {},
        "cells": [
            {"cell_type": "code", "source": ["print(x)"], "outputs": [{"text": ["ratio 0.58x\n"]}]},
            {"cell_type": "markdown", "source": ["ours runs at 0.58× of cuBLAS, 1,024 tokens/s"]},
            {"cell_type": "markdown", "source": ["a 1×128 tile, 8 × 2048 tokens"]},
        ],
    }
    assert _unmatched_numbers(nb) == ["cell 1: '1,024 tokens/s'"]
    nb["cells"][1]["source"] = ["ours runs at 0.6× (rounded), 0.36× elsewhere"]
    assert _unmatched_numbers(nb) == ["cell 1: '0.36×'"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_wall_of_code(path):
    long = [
        f"cell {i}: {len(_source(c).splitlines())} lines"
        for i, c in enumerate(_load(path)["cells"])
        if c["cell_type"] == "code" and len(_source(c).splitlines()) > MAX_LINES
    ]
    assert not long, f"code cells over {MAX_LINES} lines (move plumbing to dsv3lite.viz): {long}"


def _png_dpi(data: bytes) -> float | None:
    """The resolution a PNG declares (its pHYs chunk), in dots per inch; None without one."""
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"pHYs":
            x, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            return x * 0.0254 if unit == 1 else None
        pos += 12 + length
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_are_legible(path):
    low = []
    for i, cell in enumerate(_load(path)["cells"]):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                dpi = _png_dpi(b64decode("".join(png)))
                if dpi is None or dpi < MIN_DPI - 1:
                    low.append(f"cell {i}: {dpi} dpi")
    assert not low, f"figures under {MIN_DPI} dpi (call dsv3lite.viz.style()): {low}"


ROOT = Path(__file__).parent.parent
# a document cited by name ("FACILITATOR §2", "README.md") must be a file of the repository,
# or one of the DeepSeek-V3 release's published files, cited as "the release's ...";
# paths that climb out of it, and "the <someone>'s issue" (a tracker no reader has), never are
CITED = re.compile(r"\b([A-Z][A-Z_]{2,})(?:\.md)?(?=\s?§)|\b([\w./-]+\.md)\b")
NEVER = re.compile(r"\.\./\w|\b\w+'s issue\b|the README calls these")


DOCS = {p.name for folder in (ROOT, ROOT / "notebooks") for p in folder.glob("*.md")}


def _outside_citations(text: str) -> list[str]:
    hits = [m.group(0) for m in NEVER.finditer(text)]
    for m in CITED.finditer(text):
        name = m.group(1) + ".md" if m.group(1) else Path(m.group(2)).name
        if name not in DOCS and "release's" not in text[max(0, m.start() - 12) : m.start()]:
            hits.append(m.group(0))
    return hits


def test_the_citation_check_catches_outside_documents():
    assert _outside_citations("see FACILITATOR §2 and notebooks/FACILITATOR.md, README.md") == []
    assert _outside_citations("the release's `README_WEIGHTS.md` says") == []
    assert _outside_citations("as NOTES §4 says; see ../elsewhere/NOTES.md") == [
        "../e",
        "NOTES",
        "elsewhere/NOTES.md",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_nothing_outside_the_repository_is_cited(path):
    hits = [
        f"cell {i}: {hit!r}"
        for i, c in enumerate(_load(path)["cells"])
        for hit in _outside_citations(_source(c))
    ]
    assert not hits, hits


@pytest.mark.parametrize("path", STUDENT, ids=lambda p: p.stem)
def test_exercises_are_left_to_the_student(path):
    cells = _load(path)["cells"]
    runs_solution = [i for i, c in enumerate(cells) if "exercises.solutions" in _source(c)]
    assert not runs_solution, f"cells {runs_solution} run a reference solution"
    for i, c in enumerate(cells):
        if c["cell_type"] == "code" and re.search(r"^check_\w+\(", _source(c), re.M):
            out = "".join(_output_texts(c))
            assert "not done yet" in out or "not checked" in out, (
                f"cell {i}: the saved output of a check should show the exercise open, got {out!r}"
            )


@pytest.mark.parametrize("stem, names", DIAGRAMS.items())
def test_every_idea_has_its_picture(stem, names):
    nb = _load(next(p for p in NOTEBOOKS if p.stem == stem))
    for name in names:
        drawn = [
            c
            for c in nb["cells"]
            if c["cell_type"] == "code"
            and name in _source(c)
            and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))
        ]
        assert drawn, f"{stem} never draws dsv3lite.viz.{name} (with its figure in the output)"
