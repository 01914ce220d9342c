"""The pipeline runtime against one process: same losses, same gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import preset
from ..parallel.pipeline import PipelineRuntime, build_stages, stage_indices
from . import rel_err


def _mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).pow(2).mean()


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def run_and_check(
    kind: str,
    pp: int,
    micro_batches: int,
    seq_len: int = 8,
    seed: int = 0,
    overrides: dict | None = None,
    warmup: bool = True,
) -> dict:
    """Run on every rank of a process group (e.g. via ``launch``): one step of ``kind`` over
    ``pp`` stages of the ``tiny`` preset's layers (micro-batches of one sequence, MSE loss
    against random targets) — after an untimed warm-up step, with ``warmup`` — then the same
    step on one process, here, as the reference.

    Returns this rank's stages, its losses ((pipe, mb) -> loss), the reference losses in
    micro-batch order, the worst relative gradient error of its stages' parameters against
    the reference, and its measured timeline.
    """
    config = preset("tiny", **(overrides or {}))
    g = torch.Generator().manual_seed(seed + 1)
    shape = (1, seq_len, config.hidden_size)
    inputs = [torch.randn(shape, generator=g) for _ in range(micro_batches)]
    targets = [torch.randn(shape, generator=g) for _ in range(micro_batches)]
    indices = stage_indices(kind, pp, dist.get_rank())
    stages = build_stages(config, pp, seed)
    mine = [stages[s] for s in indices]
    runtime = PipelineRuntime(kind, mine, pp, micro_batches, config)
    if warmup:  # a process's first GEMMs pay one-time costs that would swamp the timeline
        runtime.step(inputs, targets, _mse)
        for stage in mine:
            stage.zero_grad(set_to_none=True)
    result = runtime.step(inputs, targets, _mse)

    ref_stages = build_stages(config, pp, seed)
    ref_losses = []
    for x, target in zip(inputs, targets):
        for stage in ref_stages:
            x = stage(x)
        loss = _mse(x, target) / micro_batches
        loss.backward()
        ref_losses.append(loss.item())
    errors = [
        rel_err(_grad(p), _grad(q))
        for s, stage in zip(indices, mine)
        for p, q in zip(stage.parameters(), ref_stages[s].parameters())
    ]
    return {
        "stages": indices,
        "losses": result.losses,
        "ref_losses": ref_losses,
        "grad_error": max(errors),
        "timeline": result.timeline,
    }
