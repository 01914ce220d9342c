"""Compiled decoder layers (``train --compile``, on by default for one CUDA process) compute what
the eager layers compute, and the choice follows the run's layout."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv3lite import DeepSeekV3, preset
from dsv3lite.errors import UserInputError
from dsv3lite.testing import rel_err
from dsv3lite.train import TrainConfig


def test_auto_compiles_a_single_cuda_process_only() -> None:
    assert TrainConfig(device="cuda").compiles()
    assert not TrainConfig(device="cpu").compiles()
    for layout in ({"fp8": True}, {"ep": 2}, {"pp": 2}):  # collectives and FP8 kernels: eager
        assert not TrainConfig(device="cuda", **layout).compiles(), layout
    assert TrainConfig(device="cpu", compile="on").compiles()
    assert not TrainConfig(device="cuda", compile="off").compiles()
    with pytest.raises(UserInputError, match="TrainConfig.compile must be one of"):
        TrainConfig(compile="yes").validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile's GPU path needs CUDA")
def test_compiled_layers_are_as_close_to_fp32_as_eager_bf16() -> None:
    """Under bf16 autocast, compiled and eager layers round differently (fused kernels keep
    intermediates in fp32), so they are compared through an fp32 eager reference: the compiled
    model may be no further from it than the eager bf16 model is."""
    torch.manual_seed(0)
    config = preset("tiny")
    with torch.device("cuda"):
        reference = DeepSeekV3(config).train()
    eager, compiled = copy.deepcopy(reference), copy.deepcopy(reference)
    compiled.compile_layers()
    ids = torch.randint(0, config.vocab_size, (4, 65), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]
    outs = {}
    for name, model in (("fp32", reference), ("eager", eager), ("compiled", compiled)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "fp32"):
            out = model(x, labels=y, mtp=True, mtp_lambda=0.3)
        out.loss.backward()
        outs[name] = out
    err = {n: rel_err(outs[n].logits, outs["fp32"].logits) for n in ("eager", "compiled")}
    assert err["compiled"] <= 1.5 * err["eager"] + 1e-3, err
    grads = {n: dict(m.named_parameters()) for n, m in (("eager", eager), ("compiled", compiled))}
    for name, p in reference.named_parameters():
        if p.grad is None or p.grad.norm() == 0:
            continue
        e = {n: rel_err(grads[n][name].grad, p.grad) for n in grads}
        assert e["compiled"] <= 1.5 * e["eager"] + 1e-2, (name, e)
