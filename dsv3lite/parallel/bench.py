"""``python -m dsv3lite bench comm``: what expert-parallel communication costs, and how much of
it the two-micro-batch overlap hides.

* CPU, gloo, 4 local processes: one MoE layer of the ``tiny`` preset, expert-parallel over the 4
  ranks. Per collective (layout, dispatch, combine): its median time when awaited at once; the
  bandwidth that makes for dispatch; the layer's wall time without and with the overlap, and
  the fraction of communication time that ran under compute (``Timeline.hidden_fraction``).
  On a small CPU the processes share cores with gloo's own threads, and loopback "transfers"
  are memory copies done by those cores: the overlap can hide waiting, not work. The numbers
  say how much that is here.
* One GPU, NCCL, a single rank (when CUDA is present): the same layer of the ``small`` preset
  in bf16, without and with the overlap. With one rank the all-to-alls are local copies, so
  this measures what the machinery itself costs (two half-size micro-batches, more launches).
"""

from __future__ import annotations

import statistics
from functools import partial

import torch

from .launch import launch
from .overlap import measure_overlap


def _summarise(results: list[dict]) -> dict:
    """Medians over ranks of each rank's medians; JSON-able (timelines dropped)."""
    out: dict = {"ranks": len(results), "tokens_per_rank": results[0]["tokens"]}
    out["dispatch_mb_per_rank"] = statistics.median(r["dispatch_bytes"] for r in results) / 1e6
    for mode in ("sequential", "overlapped"):
        rows = [r[mode] for r in results]
        out[mode] = {
            "wall_ms": statistics.median(r["wall_ms"] for r in rows),
            "hidden_fraction": statistics.median(r["hidden_fraction"] for r in rows),
            "error_vs_one_process": max(r["error"] for r in rows),
            "comm_ms": {
                name: statistics.median(r["comm_ms"][name] for r in rows)
                for name in rows[0]["comm_ms"]
            },
        }
    seq, ovl = out["sequential"], out["overlapped"]
    out["speedup"] = seq["wall_ms"] / ovl["wall_ms"]
    # the dispatch's per-micro-batch time covers half the rows
    dispatch_s = seq["comm_ms"]["dispatch"] / 1e3
    out["dispatch_gb_per_s"] = out["dispatch_mb_per_rank"] / 2 / 1e3 / dispatch_s
    return out


def run(quick: bool = False) -> dict:
    """Measure, print a table, return the numbers (JSON-able)."""
    batch, seq_len, repeats = (4, 64, 3) if quick else (8, 128, 10)
    cpu = partial(measure_overlap, batch=batch, seq_len=seq_len, repeats=repeats)
    report = {"cpu_gloo_4_ranks": _summarise(launch(cpu, 4, timeout_s=300))}
    report["cpu_gloo_4_ranks"]["shape"] = f"batch {batch} x seq {seq_len}, tiny preset, fp32"
    if torch.cuda.is_available():
        batch, seq_len, repeats = (4, 256, 3) if quick else (8, 1024, 20)
        gpu = partial(
            measure_overlap,
            batch=batch,
            seq_len=seq_len,
            repeats=repeats,
            preset_name="small",
            dtype=torch.bfloat16,
        )
        report["gpu_nccl_1_rank"] = _summarise(launch(gpu, 1, backend="nccl", timeout_s=600))
        report["gpu_nccl_1_rank"]["shape"] = f"batch {batch} x seq {seq_len}, small preset, bf16"
        report["gpu_nccl_1_rank"]["device"] = torch.cuda.get_device_name()
    print(format_table(report))
    return report


def format_table(report: dict) -> str:
    """One row per setting: wall times, speedup, hidden fraction, per-collective times."""
    head = (
        f"{'setting':<18} {'shape':<40} {'no overlap':>11} {'overlap':>9} {'speedup':>8} "
        f"{'hidden':>7} {'layout':>8} {'dispatch':>9} {'combine':>8} {'dispatch BW':>12}"
    )
    lines = [
        "bench comm: expert-parallel all-to-all and two-micro-batch overlap",
        head,
        "-" * len(head),
    ]
    for name, r in report.items():
        c = r["sequential"]["comm_ms"]
        lines.append(
            f"{name:<18} {r['shape']:<40} {r['sequential']['wall_ms']:>8.2f} ms "
            f"{r['overlapped']['wall_ms']:>6.2f} ms {r['speedup']:>7.2f}x "
            f"{r['overlapped']['hidden_fraction']:>6.0%} {c['layout']:>5.2f} ms "
            f"{c['dispatch']:>6.2f} ms {c['combine']:>5.2f} ms {r['dispatch_gb_per_s']:>7.2f} GB/s"
        )
    lines.append(
        "collective times: median when awaited at once (per micro-batch); hidden: share of "
        "communication time during which the rank computed, with the overlap"
    )
    return "\n".join(lines)
