"""FP8 mixed-precision training with fine-grained scales (report §3.3).

    from dsv3lite.fp8 import act_quant, weight_quant, fp8_gemm, FP8Linear, to_fp8
    q, s = act_quant(x)            # x ≈ q · s, one scale per 1×128 tile
    model = to_fp8(model)          # the §3.3.1 recipe: attention projections and MLPs in FP8

``quant`` is the package's one quantizer (its docstring states the rules): Triton kernels in
``dsv3lite.kernels`` on a GPU, their plain-torch references on the CPU. ``numerics`` holds the
helpers of the numerics study; ``python -m dsv3lite bench fp8`` times the kernels against cuBLAS.
"""

from .linear import FP8Linear
from .quant import (
    BLOCK,
    FP8,
    FP8_MAX,
    act_dequant,
    act_quant,
    act_quant_t,
    fp8_gemm,
    weight_dequant,
    weight_quant,
)
from .recipe import to_fp8

__all__ = [
    "act_quant",
    "act_quant_t",
    "weight_quant",
    "fp8_gemm",
    "act_dequant",
    "weight_dequant",
    "FP8Linear",
    "to_fp8",
    "BLOCK",
    "FP8",
    "FP8_MAX",
]
