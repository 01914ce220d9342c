"""FP8Linear: an nn.Linear whose three GEMMs run in FP8 (report §3.3, Figure 6).

A linear layer y = x Wᵀ costs three GEMMs in training, and the report runs all three in FP8
with E4M3 everywhere (§3.3.1), each operand quantized with fine-grained scales (§3.3.2):

====== ================ ============================ ========================= ===========
GEMM   computes         a (1×128 scales along K)     b                         output
====== ================ ============================ ========================= ===========
Fprop  y  = x Wᵀ        x, per token                 W, 128×128 blocks         x's dtype
Dgrad  dx = dy W        dy, per token                Wᵀ, the same blocks       x's dtype
Wgrad  dW = dyᵀ x       dyᵀ, per channel, 128 tokens xᵀ, per channel, 128 tok. float32
====== ================ ============================ ========================= ===========

Why weights in square blocks: Dgrad multiplies by Wᵀ, and a 128×128 block of W is a block
of Wᵀ, so the codes are transposed and the scales kept — no second quantization. Activations
get 1×128 tiles (outliers sit in channels); Wgrad reduces over *tokens*, so there both of its
operands are quantized along tokens (128×1) and transposed so that tokens are contiguous:
``act_quant_t``. The Wgrad operand for x is built in the forward pass and saved instead of x
itself: one byte per element instead of two — the report's FP8 activation caching (§3.3.4),
without quantizing twice.

The master weight stays a plain float32 ``weight`` Parameter (the optimizer updates it in full
precision; checkpoints keep their keys; the absorbed MLA path that reads
``kv_b_proj.weight`` directly keeps working). FP8 copies are made on the fly, each step.

Sizes that are not multiples of 128 (the tiny preset has 32, 64, 96): the GEMMs need the
reduction dimension in whole 128-blocks, so the operands are zero-padded along it. Zeros add
nothing to a dot product and never raise a group's amax, so the result is the same as with
ragged groups; the cost is wasted work on tiny layers only (the release's sizes are all
multiples of 128).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8_quant import check_scale_fmt
from .quant import BLOCK, act_quant, act_quant_t, fp8_gemm, weight_quant


def _pad_to_block(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad ``t`` (2-D) along ``dims`` to multiples of 128; no copy when already aligned."""
    pad = [0, 0, 0, 0]  # F.pad order: last dim (left, right), then first dim
    for d in dims:
        pad[1 if d == 1 else 3] = -t.shape[d] % BLOCK
    return F.pad(t, pad) if any(pad) else t


class _FP8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with Fprop, Dgrad and Wgrad in FP8 (see the table above)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None, training: bool):
        """``training``: grad mode outside (inside forward it is always off); without it, only
        Fprop runs and nothing is saved."""
        n, k = weight.shape
        x2 = x.reshape(-1, k)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype, ctx.scale_fmt = (
            x.shape,
            x.dtype,
            weight.dtype,
            scale_fmt,
        )
        # Fprop: K padded on both operands; W padded along N too, for Dgrad's reduction
        xq, xs = act_quant(_pad_to_block(x2, (1,)), scale_fmt=scale_fmt)
        wq, ws = weight_quant(_pad_to_block(weight, (0, 1)), scale_fmt=scale_fmt)
        y = fp8_gemm(xq, xs, wq[:n], ws, out_dtype=x.dtype)
        saved = [wq, ws] if training and ctx.needs_input_grad[0] else [None, None]
        if training and ctx.needs_input_grad[1]:
            saved += act_quant_t(x2, scale_fmt=scale_fmt)  # xᵀ in 128×1 tiles, for Wgrad
        else:
            saved += [None, None]
        ctx.save_for_backward(*saved)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        wq, ws, xtq, xts = ctx.saved_tensors
        k = ctx.x_shape[-1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: dx = dy W, reducing over N
            dyq, dys = act_quant(_pad_to_block(dy2, (1,)), scale_fmt=ctx.scale_fmt)
            wtq = wq.t().contiguous()  # Wᵀ's blocks are W's blocks, transposed
            dx = fp8_gemm(dyq, dys, wtq[:k], ws.t(), out_dtype=ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad: dW = dyᵀ x, reducing over tokens, in float32
            dytq, dyts = act_quant_t(dy2, scale_fmt=ctx.scale_fmt)
            dw = fp8_gemm(dytq, dyts, xtq, xts, out_dtype=torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """y = x Wᵀ with its three GEMMs in FP8 (the table above); ``FP8Linear`` without a module,
    for weights held elsewhere (a slice of the stacked experts)."""
    if x.shape[:-1].numel() == 0:  # no tokens: an empty output and a zero weight gradient
        return F.linear(x, weight.to(x.dtype))
    return _FP8LinearFunction.apply(x, weight, scale_fmt, torch.is_grad_enabled())


class FP8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters, same state_dict keys) computing in FP8.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``; ``weight`` is the
            full-precision master copy (float32 unless ``dtype`` says otherwise).
        scale_fmt: None for float32 scales, ``"ue8m0"`` for power-of-two scales.

    The output has the input's dtype; the bias, if any, is added in that dtype after the
    GEMM. Any in/out sizes work (see the module text on padding). Inputs must be float32,
    bfloat16 or float16. On the CPU the numerics are emulated by the torch reference.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scale_fmt: str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        check_scale_fmt(scale_fmt)
        self.scale_fmt = scale_fmt

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt: str | None = None) -> FP8Linear:
        """An FP8Linear sharing ``linear``'s Parameters (no copy: optimizers and ties hold)."""
        new = cls(linear.in_features, linear.out_features, False, "meta", scale_fmt=scale_fmt)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.scale_fmt)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_fmt={self.scale_fmt}"
