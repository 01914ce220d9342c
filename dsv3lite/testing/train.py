"""One distributed training step (``--ep`` or ``--pp``) against the same step on one process."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..config import preset
from ..model import DeepSeekV3
from ..train.config import TrainConfig
from ..train.distributed import Parallel, _local_part, setup_parallel
from ..train.optim import build_optimizer
from ..train.trainer import _train_step
from . import rel_err


def step_check(
    layout: str,
    balance: str = "aux-free",
    batch_size: int = 4,
    seq_len: int = 16,
    ep_overlap: bool = False,
) -> dict:
    """Run on every rank of a process group (e.g. via ``launch``): one training step of the
    ``tiny`` preset laid out as ``layout`` ('ep' or 'pp') over all ranks — then the same step on
    one process on the same tokens (EP: every rank's batch, concatenated), here, as reference.

    Clipping is made to bite (grad_clip 0.1) and the balance loss to matter (α 0.1). Returns the
    logged losses of both, and the worst relative error over the parameters this rank trains of
    their gradients (after clipping) and weights (after the step), the largest bias difference,
    and whether the step's expert loads are equal. ``ep_overlap``: EP with the two-micro-batch
    overlap of its all-to-alls.
    """
    world = dist.get_world_size()
    cfg = TrainConfig(
        **{layout: world},
        balance=balance,
        batch_size=batch_size,
        seq_len=seq_len,
        alpha=0.1,
        grad_clip=0.1,
        progress=False,
        ep_overlap=ep_overlap,
    )
    par = setup_parallel(cfg)
    torch.manual_seed(cfg.seed)
    model = DeepSeekV3(preset(cfg.preset))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    windows = torch.randint(
        0, model.config.vocab_size, (par.dp_size * batch_size, seq_len + 1), generator=g
    )
    mine = windows[par.dp_rank * batch_size : (par.dp_rank + 1) * batch_size]
    trained = par.prepare(model)
    opt = build_optimizer(trained, cfg)
    x, y = mine[:, :-1], mine[:, 1:]
    logged, loads = _train_step(par, model, opt, x, y, cfg, cfg.lr, model.moe_layers())
    one = Parallel(torch.device("cpu"))
    opt = build_optimizer(one.prepare(ref), cfg)
    x, y = windows[:, :-1], windows[:, 1:]
    ref_logged, ref_loads = _train_step(one, ref, opt, x, y, cfg, cfg.lr, ref.moe_layers())
    names = {id(p): name for name, p in model.named_parameters()}
    theirs = dict(ref.named_parameters())
    # (name, ours, the reference's); an EP rank's expert stacks are a slice of the reference's
    triples = [(names[id(p)], p, theirs[names[id(p)]]) for p in trained.parameters()]
    return {
        "losses": par.reduce_logged(logged),
        "ref_losses": one.reduce_logged(ref_logged),
        "grad_error": max(
            rel_err(_grad(p), _local_part(model, n, _grad(q))) for n, p, q in triples
        ),
        "weight_error": max(rel_err(p, _local_part(model, n, q)) for n, p, q in triples),
        "bias_error": max(
            (a.gate.e_score_correction_bias - b.gate.e_score_correction_bias).abs().max().item()
            for a, b in zip(model.moe_layers(), ref.moe_layers())
        ),
        "loads_equal": all(torch.equal(a, b) for a, b in zip(loads, ref_loads)),
    }


def _grad(p: torch.Tensor) -> torch.Tensor:
    """An unused parameter's missing gradient is zero (an expert that got no token)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)
