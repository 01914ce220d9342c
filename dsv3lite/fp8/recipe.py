"""The mixed-precision recipe of report §3.3.1: which Linear layers train in FP8.

"The majority of core computation kernels, i.e., GEMM operations, are implemented in FP8
precision", while the report keeps "the embedding module, the output head, MoE gating modules,
normalization operators, and attention operators" in their original precision, because they are
sensitive to low precision or cheap enough that FP8 would not pay. Here that means:

* FP8: the attention projections (``q_a_proj``, ``q_b_proj`` or ``q_proj``,
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) and every MLP Linear (``gate_proj``,
  ``up_proj``, ``down_proj``) — of the dense layers, the routed experts and the shared experts,
  in the main model and in the MTP modules (the routed experts are stacked parameters, not
  Linear modules: their ``Experts.linear`` becomes ``fp8_linear``, the same three GEMMs);
* higher precision: the embedding, ``lm_head``, the router (``mlp.gate``), every RMSNorm, the
  attention core (scores, softmax, the weighted sum) and the MTP projection ``eh_proj``
  (it is not among the report's FP8 GEMMs; it is one small matrix per MTP module).

The absorbed MLA path reads ``kv_b_proj.weight`` directly and multiplies in full precision,
so after ``to_fp8`` the naive and absorbed paths differ by the FP8 error of that projection.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts
from ..model.mla import MLA
from ..model.moe import MLP
from .linear import FP8Linear, fp8_linear

ATTENTION_PROJECTIONS = (
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
)
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def to_fp8(model: nn.Module, scale_fmt: str | None = None) -> nn.Module:
    """Swap the FP8 GEMMs' nn.Linear modules of ``model`` for FP8Linear, and the routed
    experts' ``Experts.linear`` for ``fp8_linear``, in place; return it.

    Parameters are shared, not copied, so ``state_dict`` keys and tensors are unchanged and an
    optimizer built before the call still holds the right Parameters. Calling it twice is a
    no-op the second time.
    """
    for module in list(model.modules()):
        if isinstance(module, Experts):
            if module.linear is F.linear:  # not converted yet
                module.linear = functools.partial(fp8_linear, scale_fmt=scale_fmt)
            continue
        if isinstance(module, MLA):
            names = ATTENTION_PROJECTIONS
        elif isinstance(module, MLP):
            names = MLP_PROJECTIONS
        else:
            continue
        for name in names:
            child = getattr(module, name, None)
            if type(child) is nn.Linear:
                setattr(module, name, FP8Linear.from_linear(child, scale_fmt))
    return model
