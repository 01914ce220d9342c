# Everything a fresh machine needs: `make demo`, `make test`, `make lab`.
# TORCH_SPEC picks the torch installed first; a user who already has a torch in the
# interpreter that builds the venv can keep it with `make demo TORCH_SPEC=` and
# VENV_FLAGS=--system-site-packages.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint lab bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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

clean:
	rm -rf $(VENV) build *.egg-info
