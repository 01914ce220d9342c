# Everything a fresh machine needs: `make demo`, `make test`, `make lab`.
# TORCH_SPEC picks the torch installed first; a user who already has a torch in the
# interpreter that builds the venv can keep it with `make demo TORCH_SPEC=` and
# VENV_FLAGS=--system-site-packages. TORCH_INDEX adds an index for that torch: on Linux, PyPI's
# torch is the multi-GB CUDA build, so a laptop wants
#   make demo TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
# (its 2.13.0+cpu sorts above PyPI's 2.13.0, so pip takes the CPU build).
#
# Offline (workshops without network; notebooks/FACILITATOR.md): `make wheelhouse`, run once
# with network, downloads every wheel the course installs (pip, setuptools and wheel to build
# the package, the pinned torch, and .[dev] with all dependencies) into wheelhouse/, for this
# machine's Python and platform. While wheelhouse/ holds wheels, every install below reads
# from it alone (pip --no-index --find-links wheelhouse): copy the checkout with its
# wheelhouse/ to a laptop of the same platform and `make demo`, `make test`, `make lab` need no
# network. OFFLINE=1 forces that mode, OFFLINE= turns it off.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV_FLAGS ?=
WHEELHOUSE ?= wheelhouse
OFFLINE ?= $(if $(wildcard $(WHEELHOUSE)/*.whl),1,)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install --quiet $(if $(OFFLINE),--no-index --find-links $(WHEELHOUSE),)

.PHONY: demo test lint lab bench doctor wheelhouse docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(if $(TORCH_SPEC),$(PIP) "$(TORCH_SPEC)" $(if $(OFFLINE),,$(TORCH_INDEX)))
	$(PIP) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dsv3lite demo

lint: $(STAMP)
	$(BIN)/ruff check dsv3lite kernels tests notebooks
	$(BIN)/ruff format --check dsv3lite kernels tests notebooks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env notebooks

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

bench: $(STAMP)
	$(BIN)/python -m dsv3lite bench model

# Is this machine ready for the course? Needs nothing installed: without .venv it examines
# $(PYTHON) and says what is missing.
doctor:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) dsv3lite/doctor.py

# Always online (it is what makes offline possible); run again to add what changed.
# WHEEL_FLAGS passes more to pip download.
wheelhouse: $(BIN)/python
	$(BIN)/python -m pip download --dest $(WHEELHOUSE) $(TORCH_INDEX) $(WHEEL_FLAGS) \
		pip "setuptools>=68" wheel "$(TORCH_SPEC)" ".[dev]"
	@echo "$(WHEELHOUSE)/: $$(ls $(WHEELHOUSE) | wc -l) files, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# The notebooks as they are saved (already executed: nothing runs), as static HTML in site/,
# with an index that lists them in order under their titles.
define SITE_INDEX
import html, json, pathlib, sys
notebooks, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = []
for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
    cells = json.loads(nb.read_text())["cells"]
    text = "".join(cells[0]["source"]) if cells and cells[0]["cell_type"] == "markdown" else ""
    title = text.splitlines()[0].lstrip("# ").strip() if text else nb.stem
    rows.append(f'<li><a href="{nb.stem}.html">{html.escape(title)}</a></li>')
page = ("<!doctype html><meta charset='utf-8'><title>dsv3lite — the course</title>"
        "<h1>dsv3lite — DeepSeek-V3's infrastructure, one notebook at a time</h1>"
        "<p>The notebooks as committed, with their outputs. Run them yourself: see the "
        "project's README.</p><ul>" + "".join(rows) + "</ul>")
(site / "index.html").write_text(page)
print(f"{site}/index.html: {len(rows)} notebooks")
endef
export SITE_INDEX

docs: $(STAMP)
	rm -rf site
	$(BIN)/jupyter nbconvert --to html --output-dir site notebooks/[0-9][0-9]_*.ipynb
	$(BIN)/python -c "$$SITE_INDEX" notebooks site

clean:
	rm -rf $(VENV) build *.egg-info site
