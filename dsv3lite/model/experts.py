"""The routed experts of one MoE layer, stored stacked: FFN_i(u) = W_down,i (silu(W_gate,i u) · W_up,i u).

Experts are held as two parameters, transformers 5's in-memory layout:

* ``gate_up_proj`` [E, 2I, hidden] — expert i's gate rows, then its up rows;
* ``down_proj``    [E, hidden, I].

A checkpoint stores the release's per-expert keys (``experts.{i}.gate_proj.weight`` ...):
checkpoint.py maps them onto slices of these two tensors, so there is one copy of the experts.

``forward`` takes the (token, expert) pairs already sorted by expert — expert i owns the
contiguous rows counts[0] + … + counts[i-1] onwards — and runs every expert on its rows. How
is chosen by ``impl`` (one of ``MOE_IMPLS``):

* ``local`` — a loop over the experts, one pair of matmuls on each one's slice: plain torch,
  the reference, and the fastest on a CPU (its one host sync reads the counts);
* ``grouped_mm`` — ``torch._grouped_mm``: one kernel per projection for all experts, offsets
  read on the device (no host sync), forward and backward (torch ≥ 2.9 on CUDA, 2.10 on CPU);
* ``triton`` — the project's grouped GEMM (kernels/grouped_gemm.py, ``moe_experts``): gate and
  up in one kernel with SwiGLU fused, then down; its backward is grouped GEMMs too (bf16/fp16,
  CUDA, or the CPU under ``TRITON_INTERPRET=1``);
* ``auto`` (default) — ``CUDA_DEFAULT`` for bf16/fp16 on a GPU, ``local`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._triton import AVAILABLE as TRITON_AVAILABLE

MOE_IMPLS = ("auto", "local", "grouped_mm", "triton")
# What ``auto`` takes on a GPU: "grouped_mm" (CUTLASS grouped GEMMs, tuned, with torch's own
# backward) or "triton" (SwiGLU fused in the epilogue, but plain Triton tiles and a backward
# that recomputes gate and up). Pick the faster one measured by ``bench``.
CUDA_DEFAULT = "grouped_mm"

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Experts(nn.Module):
    """N routed experts of the same shape, stacked (see the module docstring).

    ``linear`` is the GEMM of the ``local`` path, y = x Wᵀ: ``F.linear``, or FP8's after
    ``dsv3lite.fp8.to_fp8`` — then every ``impl`` takes the local path: the FP8 GEMMs
    (Fprop, Dgrad, Wgrad) run per expert, as in any other FP8 linear layer.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self.linear: Linear = F.linear
        self._impl = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, expert by expert: U(±1/√fan_in)."""
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1 / math.sqrt(w.shape[-1]) if w.shape[-1] else 0.0
            w.uniform_(-bound, bound)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise ValueError(
                "moe_impl 'grouped_mm' needs torch._grouped_mm (torch >= 2.9); this is torch "
                f"{torch.__version__}: use 'local'"
            )
        if impl == "triton" and not TRITON_AVAILABLE:
            raise ValueError("moe_impl 'triton' needs Triton, which is not installed: use 'local'")
        self._impl = impl

    def __len__(self) -> int:
        return self.gate_up_proj.shape[0]

    def __getitem__(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Expert i alone, as a function: ``experts[i](x)`` = FFN_i(x) for x [..., hidden]."""
        return lambda x: self._ffn(x, self.gate_up_proj[i], self.down_proj[i])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, hidden], rows sorted by expert; counts [E] rows per expert (Σ = M) → [M, hidden]."""
        impl = self._resolve(x)
        if impl == "grouped_mm":
            return self._grouped_mm(x, counts)
        if impl == "triton":
            return self._triton(x, counts)
        # split and unbind, not slicing and indexing: one backward node each, where a slice's
        # backward would build a zero gradient of the whole tensor per expert
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        rows = x.split(counts.tolist())  # one host sync, not one per expert
        pieces = [self._ffn(r, gate_up[i], down[i]) for i, r in enumerate(rows) if r.shape[0]]
        return torch.cat(pieces) if pieces else x  # x: keeps the graph when no row came

    def _ffn(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear(x, gate_up).chunk(2, dim=-1)
        return self.linear(F.silu(gate) * up, down)

    def _resolve(self, x: torch.Tensor) -> str:
        if self.linear is not F.linear:  # FP8 (see the class docstring)
            return "local"
        if self._impl != "auto":
            return self._impl
        fast = x.is_cuda and _compute_dtype(x) in (torch.bfloat16, torch.float16)
        available = TRITON_AVAILABLE if CUDA_DEFAULT == "triton" else hasattr(torch, "_grouped_mm")
        return CUDA_DEFAULT if fast and available else "local"

    def _grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Both projections as grouped GEMMs: expert i multiplies rows offs[i-1]:offs[i].
        ``torch._grouped_mm`` ignores autocast, so operands are cast to its dtype here."""
        dtype = _compute_dtype(x)
        offs = counts.cumsum(0).to(torch.int32)
        w_gate_up = self.gate_up_proj.to(dtype).transpose(1, 2)
        gate, up = torch._grouped_mm(x.to(dtype), w_gate_up, offs=offs).chunk(2, dim=-1)
        h = F.silu(gate) * up
        return torch._grouped_mm(h, self.down_proj.to(dtype).transpose(1, 2), offs=offs)

    def _triton(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """kernels/grouped_gemm.py's differentiable experts, in autocast's dtype (Triton
        kernels see raw tensors); offsets start at 0 there."""
        from ..kernels.grouped_gemm import moe_experts  # imports Triton: only on this path

        dtype = _compute_dtype(x)
        offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        w_gate_up, w_down = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        return moe_experts(x.to(dtype), offsets, w_gate_up, w_down)


def set_moe_impl(model: nn.Module, impl: str) -> None:
    """Run every ``Experts`` inside ``model`` with ``impl`` (one of ``MOE_IMPLS``)."""
    for experts in model.modules():
        if isinstance(experts, Experts):
            experts.impl = impl


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's, when it is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
