"""The one benchmark harness: time, check, record, print.

Every suite returns ``Results`` — rows, the ratios between them and, where it measured them,
the device's ceilings — and ``run`` prints them as one table and writes them as one JSON file
with the environment beside them (device, torch, triton, date), so that a figure can always be
traced to the run that produced it.

Timing (``median_ms``): on a GPU ``triton.testing.do_bench`` (its own warm-up, the L2 cache
flushed between calls, the median); on the CPU the median of ``time.perf_counter`` over at
least 5 calls and 1 s, after 2 warm-up calls. A candidate is checked against its reference
before it is timed (``check``): a fast wrong answer must not reach the table.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..testing import rel_err


@dataclass
class Row:
    """One timed configuration. ``median_ms`` is None when it was skipped (``note`` says why).

    ``value`` is the row's figure of merit in ``unit`` (tokens/s, TFLOP/s, GB/s); ``extra``
    holds suite-specific numbers (a cache's bytes, a fraction of a ceiling), written into the
    row's JSON object beside the common fields.
    """

    name: str
    shape: str
    median_ms: float | None
    value: float | None = None
    unit: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        common = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**common, **self.extra}


@dataclass
class Ratio:
    """How much faster ``candidate`` is than ``baseline`` (> 1: faster)."""

    name: str
    candidate: str
    baseline: str
    value: float


@dataclass
class Results:
    """What a suite's ``run(device, quick)`` returns."""

    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    ceilings: dict[str, float | None] = field(default_factory=dict)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}")

    def ratio(self, name: str, candidate: str, baseline: str, by: str = "time") -> None:
        """Record candidate over baseline when both were measured: by "time" (baseline's
        time / candidate's, for the same work) or by "value" (the candidate's figure of merit /
        the baseline's, e.g. two bandwidths over different bytes)."""
        c, b = self.row(candidate), self.row(baseline)
        if by == "time" and c.median_ms and b.median_ms:
            self.ratios.append(Ratio(name, candidate, baseline, b.median_ms / c.median_ms))
        elif by == "value" and c.value and b.value:
            self.ratios.append(Ratio(name, candidate, baseline, c.value / b.value))


# ---------------------------------------------------------------------------------- measuring
def median_ms(fn: Callable[[], Any], device: torch.device, quick: bool) -> float:
    """Median milliseconds per call of ``fn`` after warm-up (see the module docstring)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (100, 500)  # milliseconds of running, not calls
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    warmup, reps, seconds = (1, 3, 0.0) if quick else (2, 5, 1.0)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < reps or sum(times) < seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def check(what: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Relative error of ``out`` against ``ref``; raises if it is above ``tol``."""
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.2e} against its reference > {tol}")
    return err


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, float | None]:
    """What the GPU does at its best, in this run: a 2 GiB device-to-device copy (GB/s, bytes
    read + written) and an 8192³ bf16 matmul (TFLOP/s). None on the CPU."""
    if device.type != "cuda":
        return {"copy_gbs": None, "gemm_tflops": None}
    src = torch.randn(2**29, device=device)  # 2 GiB of float32
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.nbytes / median_ms(lambda: dst.copy_(src), device, quick) / 1e6
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return {
        "copy_gbs": copy_gbs,
        "gemm_tflops": 2 * n**3 / median_ms(lambda: a @ b, device, quick) / 1e9,
    }


def environment(device: torch.device) -> dict[str, Any]:
    """What a reader needs to reproduce a figure: the device, the versions, the date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------- reporting
def record(suite: str, quick: bool, env: dict[str, Any], results: Results) -> dict[str, Any]:
    """The JSON object of a run: what notebooks read from ``dsv3lite/results/``."""
    out: dict[str, Any] = {"suite": suite, "quick": quick, "env": env}
    if results.ceilings:
        out["ceilings"] = results.ceilings
    out["rows"] = [r.record() for r in results.rows]
    out["ratios"] = [dataclasses.asdict(r) for r in results.ratios]
    return out


def format_table(suite: str, env: dict[str, Any], results: Results) -> str:
    """A plain-text table of the rows, then the ratios."""
    lines = [
        f"bench {suite} on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
        f"{env['date']}"
    ]
    c = results.ceilings
    if c.get("copy_gbs"):
        lines.append(
            f"ceilings: copy {c['copy_gbs']:,.0f} GB/s, bf16 GEMM {c['gemm_tflops']:,.0f} TFLOP/s"
        )
    width = max([len(r.name) for r in results.rows] + [20]) + 2
    shape_width = max([len(r.shape) for r in results.rows] + [10]) + 2
    head = f"{'what':<{width}}{'shape':<{shape_width}}{'median ms':>11}{'value':>13}  {'unit':<10}"
    lines += ["", head + "note"]
    for r in results.rows:
        ms = f"{r.median_ms:.3f}" if r.median_ms is not None else "-"
        value = (
            "-" if r.value is None else f"{r.value:,.0f}" if r.value >= 100 else f"{r.value:.3g}"
        )
        lines.append(
            f"{r.name:<{width}}{r.shape:<{shape_width}}{ms:>11}{value:>13}  {r.unit:<10}{r.note}"
        )
    if results.ratios:
        lines.append("")
        ratio_width = max(len(r.name) for r in results.ratios) + 2
        lines += [f"{r.name:<{ratio_width}}{r.value:>8.2f}x" for r in results.ratios]
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    """'auto': cuda when present, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def default_out(suite: str, device: torch.device) -> Path:
    """bench_results/<suite>-<device>.json, the device as a slug ('cpu', 'nvidia-h200')."""
    slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-")
    return Path("bench_results") / f"{suite}-{slug}.json"
