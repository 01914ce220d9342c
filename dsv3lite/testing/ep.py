"""Expert parallelism against one process: ``ep_check`` (one MoE layer, forward and backward)
and ``measure_overlap`` (one decoder layer, with and without the two-micro-batch overlap).

Both run on every rank of a process group (e.g. via ``parallel.launch``); notebook 06 and the
tests call them on CPU ranks over gloo.
"""

from __future__ import annotations

import copy
import statistics

import torch
import torch.distributed as dist

from ..config import preset
from ..fp8 import BLOCK
from ..model.block import DecoderLayer
from ..model.moe import MoE
from ..model.rope import RotaryEmbedding
from ..parallel.expert_parallel import shard_moe
from ..parallel.overlap import Timeline
from ..parallel.pipeline import causal_inputs
from . import rel_err


def ep_check(tokens_per_rank: int = 32, seed: int = 0, fp8_dispatch: bool = False) -> dict:
    """The ``tiny`` preset's MoE, sharded over all ranks, forward and backward on this rank's
    tokens — against the same MoE run here on every rank's tokens. Returns this rank's plan
    (what it sent and received) and its errors."""
    config = preset("tiny")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
    ep = copy.deepcopy(moe)
    dispatcher = shard_moe(ep, fp8_dispatch=fp8_dispatch)
    x = torch.randn(world * tokens_per_rank, config.hidden_size)
    probe = torch.randn_like(x)
    ref, _ = moe(x)
    (ref * probe).sum().backward()
    mine = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)

    routing = ep.gate(x[mine])
    recv_counts, pending = dispatcher.exchange_counts(routing)
    pending.wait()
    plan = dispatcher.plan(routing, recv_counts)
    y, _ = ep(x[mine])
    (y * probe[mine]).sum().backward()
    first, n = dispatcher.first_expert, dispatcher.n_local
    return {
        "experts": list(range(first, first + n)),
        "send_splits": plan.send_splits,
        "recv_splits": plan.recv_splits,
        "recv_counts": plan.recv_counts.tolist(),
        "max_ranks_per_token": int(dispatcher.ranks_reached(routing).max()),
        "output_error": rel_err(y, ref[mine]),
        "expert_grad_error": max(
            rel_err(p.grad, q.grad[first : first + n])
            for p, q in zip(ep.experts.parameters(), moe.experts.parameters())
        ),
    }


def measure_overlap(
    batch: int = 4,
    seq_len: int = 64,
    repeats: int = 5,
    seed: int = 0,
    fp8_dispatch: bool = False,
    preset_name: str = "tiny",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """One MoE decoder layer of a preset, its experts sharded over all ranks, forward with and
    without the overlap (``ExpertParallelDispatcher.overlap``).

    Returns this rank's numbers: each mode's error against the single-process layer, its median
    wall time, its median hidden fraction of communication, the median duration of each kind
    of collective, and its last repeat's timeline; plus the bytes this rank dispatches. Each
    repeat starts after a barrier, so that the ranks' timelines line up.
    """
    config = preset(preset_name)
    rank = dist.get_rank()
    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(seed)
    layer = DecoderLayer(config, config.first_k_dense_replace).to(device)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            )
    layer = layer.to(dtype)
    x = torch.randn(dist.get_world_size() * batch, seq_len, config.hidden_size, device=device)
    x = x[rank * batch : (rank + 1) * batch].to(dtype)
    cos, sin, mask = causal_inputs(RotaryEmbedding(config).to(device), seq_len, device)
    ep_layer = copy.deepcopy(layer)
    dispatcher = shard_moe(ep_layer.mlp, fp8_dispatch=fp8_dispatch)
    pairs = batch * seq_len * config.num_experts_per_tok
    row_bytes = config.hidden_size * (1 + 4 / BLOCK if fp8_dispatch else x.element_size())
    result: dict = {"rank": rank, "tokens": batch * seq_len, "dispatch_bytes": pairs * row_bytes}
    with torch.no_grad():
        reference, _ = layer(x, cos, sin, mask)
        for mode in ("sequential", "overlapped"):
            dispatcher.overlap = mode == "overlapped"
            walls, hidden, comm = [], [], {}
            for i in range(repeats + 1):  # the first is a warm-up
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                dispatcher.timeline = tl = Timeline()
                y, _ = ep_layer(x, cos, sin, mask)
                if cuda:
                    torch.cuda.synchronize()
                if i:
                    walls.append(tl.now())
                    hidden.append(tl.hidden_fraction())
                    for iv in tl.intervals:
                        if iv.kind == "comm":
                            comm.setdefault(iv.name, []).append(iv.end - iv.start)
            result[mode] = {
                "error": rel_err(y, reference),
                "wall_ms": statistics.median(walls) * 1e3,
                "hidden_fraction": statistics.median(hidden),
                "comm_ms": {k: statistics.median(v) * 1e3 for k, v in comm.items()},
                "timeline": tl.intervals,
            }
    dispatcher.timeline = None
    return result
