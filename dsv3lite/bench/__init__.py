"""Benchmarks: ours and the baselines timed in one run, printed as one table, saved as JSON.

    python -m dsv3lite bench SUITE [--quick] [--device cpu|cuda] [--out PATH]

One harness (``harness``: timing, the check before timing, the environment, the table, the
JSON) and one suite interface: a suite is a module of this package with

    def run(device: torch.device, quick: bool) -> Results

registered in ``SUITES`` by name, imported only when it runs. ``quick`` means seconds, not
minutes (tests and smoke runs; the JSON records it). The suites:

* ``model`` — forward tokens/s (ours naive and absorbed MLA, transformers) and decode steps;
* ``train`` — a training step against transformers' DeepseekV3 on the same config: tokens/s,
  kernel launches per step, MFU;
* ``fp8``   — the FP8 GEMM, quantizers and FP8Linear against cuBLAS;
* ``mla``   — the Triton MLA decode kernel against eager torch, on the roofline's ceilings;
* ``moe``   — the grouped expert GEMM against ``torch._grouped_mm`` and a per-expert loop;
* ``comm``  — expert-parallel all-to-all and the two-micro-batch overlap.

Recorded GPU runs ship in ``dsv3lite/results/`` (the notebooks read them from there).
``measure`` runs a suite and returns its JSON object; ``run`` also writes it.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from .harness import (
    Ratio,
    Results,
    Row,
    default_out,
    environment,
    format_table,
    record,
    resolve_device,
)

SUITES = ("model", "train", "fp8", "mla", "moe", "comm")

__all__ = ["SUITES", "Ratio", "Results", "Row", "measure", "resolve_device", "run"]


def measure(
    suite: str, *, device: str | torch.device = "auto", quick: bool = False, **options
) -> dict:
    """Run one suite and print its table; returns its JSON object (nothing is written).
    ``options`` go to the suite's ``run`` (``train`` takes ``preset_name``)."""
    if suite not in SUITES:
        raise ValueError(f"unknown bench suite {suite!r}; allowed: {sorted(SUITES)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    results: Results = importlib.import_module(f"{__name__}.{suite}").run(dev, quick, **options)
    env = environment(dev)
    print(format_table(suite, env, results))
    return record(suite, quick, env, results)


def run(
    suite: str,
    *,
    device: str | torch.device = "auto",
    out: str | os.PathLike | None = None,
    quick: bool = False,
    **options,
) -> Path:
    """``measure``, then write the JSON to ``out`` (default bench_results/<suite>-<device>.json);
    returns its path."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    data = measure(suite, device=dev, quick=quick, **options)
    path = Path(out) if out is not None else default_out(suite, dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path
