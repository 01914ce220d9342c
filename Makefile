# Everything a fresh machine needs: `make demo`, `make test`, `make lab`.
#
# torch first, then the package. On Linux, PyPI's torch is the CUDA build (several GB with its
# nvidia-* wheels), so by default the venv takes torch's CPU build from PyTorch's CPU wheel index,
# with the triton that torch 2.13's CUDA build pins (its interpreter runs the kernels on the CPU).
# GPU=1 takes PyPI's CUDA build instead, which brings its own triton. On macOS PyPI's torch is
# the CPU/MPS build and there is no triton. TORCH_SPEC and TORCH_INDEX override the choice;
# `make demo TORCH_SPEC= VENV_FLAGS=--system-site-packages` keeps a torch you already have.
#
# Offline (workshops without network; notebooks/FACILITATOR.md): `make wheelhouse`, run once
# with network, downloads every wheel the course installs (pip, setuptools and wheel to build
# the package, torch, triton, and .[dev] with all dependencies) into wheelhouse/, for this
# machine's Python and platform. While wheelhouse/ holds wheels, every install below reads
# from it alone (pip --no-index --find-links wheelhouse): copy the checkout with its
# wheelhouse/ to a laptop of the same platform and `make demo`, `make test`, `make lab` need no
# network. OFFLINE=1 forces that mode, OFFLINE= turns it off.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
GPU ?=
ifeq ($(shell uname -s)-$(GPU),Linux-)
TORCH_SPEC ?= torch==$(TORCH_VERSION)+cpu triton==3.7.1
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu
else
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_INDEX ?=
endif
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
	@# --retries 2: where the CPU index cannot be reached (mirrors, closed networks) pip moves on in seconds
	$(if $(TORCH_SPEC),$(PIP) $(TORCH_SPEC) $(if $(OFFLINE),,$(TORCH_INDEX) $(if $(TORCH_INDEX),--retries 2,)))
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

# LAB_FLAGS passes more to JupyterLab, e.g. LAB_FLAGS="--no-browser --ip=0.0.0.0 --port=8888" on
# a remote or headless machine. As root (containers, WSL) --allow-root is added.
LAB_FLAGS ?=
lab: $(STAMP)
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_FLAGS) notebooks

bench: $(STAMP)
	$(BIN)/python -m dsv3lite bench model

# Is this machine ready for the course? Needs nothing installed: without .venv it examines
# $(PYTHON) and says what is missing.
doctor:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) dsv3lite/doctor.py

# Always online (it is what makes offline possible); run again to add what changed.
# WHEEL_FLAGS passes more to pip download.
wheelhouse: $(BIN)/python
	$(BIN)/python -m pip download --dest $(WHEELHOUSE) $(TORCH_INDEX) $(if $(TORCH_INDEX),--retries 2,) $(WHEEL_FLAGS) \
		pip "setuptools>=68" wheel $(TORCH_SPEC) ".[dev]"
	@echo "$(WHEELHOUSE)/: $$(ls $(WHEELHOUSE) | wc -l) files, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# The notebooks as they are saved (already executed: nothing runs), as static HTML in site/,
# with an index that lists them in order under their titles. The pages need no network:
# equations are MathML, widgets a note beside their static figure (dsv3lite/docs.py).
docs: $(STAMP)
	rm -rf site
	$(BIN)/python -m dsv3lite docs --out site

clean:
	rm -rf $(VENV) build *.egg-info site
