"""Pictures for the course: the diagrams of each idea, drawn from code with matplotlib, and the
plotting and widget plumbing the notebooks would otherwise carry in their cells.

Every figure follows ``style()``: at least 100 dpi, text of at least 9 pt, legends outside the
data. The diagrams (each returns its matplotlib Figure):

| function | the idea | notebook |
|---|---|---|
| ``architecture_figure`` | the model: blocks of MLA + DeepSeekMoE, the MTP modules | 00 |
| ``mla_figure`` | MLA's low-rank joint compression and the decoupled RoPE key | 01 |
| ``moe_figure`` | shared + routed experts, group-limited top-k with the bias | 02 |
| ``mtp_figure`` | the MTP modules chained after the main model | 03 |
| ``fp8_flow_figure`` | which tensors of a linear layer run in FP8 | 04 |
| ``fp8_tiles_figure`` | 1×128 / 128×128 scaling and promotion every N_C | 04, 05 |
| ``overlap_figure`` | a micro-batch's compute hiding the other's all-to-all | 06 |
| ``dualpipe_figure`` | the DualPipe schedule, both directions | 07 |
| ``speculation_figure`` | MTP drafting a token and the main model verifying it | 10 |

Names resolve lazily: importing ``dsv3lite.viz`` imports matplotlib only when a figure is drawn.
"""

from __future__ import annotations

import importlib

from .style import legend_outside, style

# public name → module of this package that defines it
_LAZY = {
    "architecture_figure": "architecture",
    "mla_figure": "mla",
    "moe_figure": "moe",
    "mtp_figure": "mtp",
    "fp8_flow_figure": "fp8",
    "fp8_tiles_figure": "fp8",
    "overlap_figure": "parallel",
    "dualpipe_figure": "parallel",
    "speculation_figure": "decoding",
}

__all__ = ["legend_outside", "style", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
