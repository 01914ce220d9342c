"""``bench comm``: what expert-parallel communication costs, and how much of it the
two-micro-batch overlap hides.

* CPU, gloo, 4 local processes: one MoE layer of the ``tiny`` preset, expert-parallel over the 4
  ranks. Per collective (layout, dispatch, combine): its median time when awaited at once, and
  the bandwidth that makes for dispatch; the layer's wall time without and with the overlap,
  and the fraction of communication time that ran under compute. On a small CPU the processes
  share cores with gloo's own threads, and loopback "transfers" are memory copies done by
  those cores: the overlap can hide waiting, not work. The numbers say how much that is here.
* One GPU, NCCL, a single rank (when CUDA is present): the same layer of the ``small`` preset
  in bf16, without and with the overlap. With one rank the all-to-alls are local copies, so
  this measures what the machinery itself costs (two half-size micro-batches, more launches).

Rows are medians over ranks of each rank's medians.
"""

from __future__ import annotations

import statistics
from functools import partial

import torch

from ..parallel.launch import launch
from .harness import Results, Row


def run(device: torch.device, quick: bool) -> Results:
    """The CPU setting always; the GPU one when ``device`` is CUDA."""
    from ..testing.ep import measure_overlap

    res = Results()
    batch, seq_len, repeats = (4, 64, 3) if quick else (8, 128, 10)
    cpu = partial(measure_overlap, batch=batch, seq_len=seq_len, repeats=repeats)
    shape = f"tiny fp32, {batch}x{seq_len} per rank"
    _summarise(res, "cpu gloo 4 ranks", shape, launch(cpu, 4, timeout_s=300))
    if device.type == "cuda":
        batch, seq_len, repeats = (4, 256, 3) if quick else (8, 1024, 20)
        gpu = partial(measure_overlap, batch=batch, seq_len=seq_len, repeats=repeats,
                      preset_name="small", dtype=torch.bfloat16)  # fmt: skip
        shape = f"small bf16, {batch}x{seq_len}"
        _summarise(res, "gpu nccl 1 rank", shape, launch(gpu, 1, backend="nccl", timeout_s=600))
    return res


def _summarise(res: Results, setting: str, shape: str, ranks: list[dict]) -> None:
    """Rows for one setting: the layer's wall time per mode, then each collective's time."""

    def median(values) -> float:
        return statistics.median(list(values))

    dispatch_mb = median(r["dispatch_bytes"] for r in ranks) / 1e6
    for mode in ("sequential", "overlapped"):
        per_rank = [r[mode] for r in ranks]
        hidden = median(r["hidden_fraction"] for r in per_rank)
        error = max(r["error"] for r in per_rank)
        note = f"hidden {hidden:.0%} of communication time; error vs one process {error:.1e}"
        row = Row(f"{setting} layer {mode}", shape, median(r["wall_ms"] for r in per_rank),
                  note=note, extra={"hidden_fraction": hidden, "error": error})  # fmt: skip
        res.rows.append(row)
    sequential = [r["sequential"] for r in ranks]
    for name in sequential[0]["comm_ms"]:
        ms = median(r["comm_ms"][name] for r in sequential)
        value, unit, note = None, "", "awaited at once"
        if name == "dispatch":  # sequential: one dispatch of all the rank's rows
            value, unit = dispatch_mb / ms, "GB/s"
            note += f"; {dispatch_mb:.2f} MB per rank"
        res.rows.append(Row(f"{setting} {name}", shape, ms, value, unit, note))
    res.ratio(f"overlap speedup, {setting}", f"{setting} layer overlapped",
              f"{setting} layer sequential")  # fmt: skip
