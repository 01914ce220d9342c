"""Benchmark results measured on a GPU, shipped with the package.

Each file is what ``python -m dsv3lite bench SUITE --out ...`` wrote on that machine: the
environment (device, torch, triton, date) and one row per measurement, ours beside the
baselines. Notebooks and the README read them from here (``importlib.resources``), so they are
found in a wheel install as well as in a checkout.
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["available", "load"]


def available() -> list[str]:
    """The recorded files' names without ``.json``, e.g. ``['fp8-nvidia-h200', ...]``."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load(suite: str, device: str = "nvidia-h200") -> dict:
    """The recorded run of ``suite`` ('fp8', 'mla', 'model', ...) on ``device``."""
    name = f"{suite}-{device}"
    if name not in available():
        raise FileNotFoundError(f"no recorded benchmark {name!r}; recorded: {available()}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
