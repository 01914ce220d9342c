"""Exercise of notebook 06: how many rows each rank sends in the dispatch all-to-all (§3.2.2)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from ..model.moe import Routing
from ..parallel.expert_parallel import ExpertParallelDispatcher
from ._check import (
    ExerciseError,
    as_tensor,
    call,
    exercise,
    expect_shape,
    fresh_seed,
    passed,
    seeded,
)

HINT = (
    "rank r owns the n_experts // world_size consecutive experts starting at r · that; every "
    "(token, expert) pair travels on its own: owner = indices // (n_experts // world_size), "
    "then count how many pairs each rank gets (torch.bincount(owner.flatten(), "
    "minlength=world_size))"
)
# (tokens, experts per token, n_experts, world_size)
CASES = ((50, 4, 16, 4), (33, 6, 32, 8), (20, 2, 8, 1), (40, 3, 8, 8))


def reference(indices: torch.Tensor, n_experts: int, world_size: int) -> list[int]:
    """``send_splits`` as ``ExpertParallelDispatcher.plan`` computes it. ``plan`` reads only the
    EP size and the number of local experts from the dispatcher, so a stand-in with those two
    gives the package's own answer without starting a process group."""
    stand_in = SimpleNamespace(ep_size=world_size, n_local=n_experts // world_size)
    load = torch.bincount(indices.flatten(), minlength=n_experts)  # as the gate counts it
    routing = Routing(weights=torch.zeros(indices.shape), indices=indices, scores=None, load=load)
    recv_counts = torch.zeros(world_size, n_experts // world_size, dtype=torch.long)
    return ExpertParallelDispatcher.plan(stand_in, routing, recv_counts).send_splits


@exercise
def check_dispatch_counts(dispatch_counts: Callable, *, seed: int | None = None) -> None:
    """Check ``dispatch_counts(indices, n_experts, world_size) -> counts``.

    ``indices`` [T, K] are the experts each of this rank's T tokens chose (distinct within a
    row); experts are sharded contiguously, rank r owning [r·E/W, (r+1)·E/W). The answer
    ``counts`` (a list or tensor of ``world_size`` integers) is how many rows this rank sends
    to each rank in the dispatch all-to-all: one per (token, expert) pair, as
    ``ExpertParallelDispatcher`` sends them (``send_splits`` of its ``plan``). Checked on four layouts,
    one rank and one expert per rank included. Raises ExerciseError saying what is wrong; prints
    a line when right.
    """
    seed = fresh_seed(seed)
    for tokens, k, n_experts, world_size in CASES:
        with seeded(seed):
            indices = torch.stack([torch.randperm(n_experts)[:k] for _ in range(tokens)])
        ref = reference(indices, n_experts, world_size)
        got = call(dispatch_counts, (indices.clone(), n_experts, world_size), seed, HINT)
        counts = as_tensor(got, "counts", seed).flatten()
        where = f" (T={tokens} tokens, K={k}, {n_experts} experts, world_size={world_size})"
        expect_shape(
            counts,
            (world_size,),
            "counts" + where,
            seed,
            HINT,
            known={(n_experts,): "one count per expert; add up the experts each rank owns"},
        )
        counts = counts.long().tolist()
        if counts == ref:
            continue
        local = n_experts // world_size
        owner = indices // local
        per_token = [len(set(row)) for row in owner.tolist()]
        distinct = torch.zeros(world_size, dtype=torch.long)
        for row in owner.tolist():
            for r in set(row):
                distinct[r] += 1
        round_robin = torch.bincount((indices % world_size).flatten(), minlength=world_size)
        if counts == distinct.tolist() and per_token != [k] * tokens:
            message = (
                "you counted tokens, not (token, expert) pairs: a token whose experts include "
                "two on one rank sends that rank two rows here (DeepEP sends it once per node "
                "and fans it out there; this package keeps the simpler scheme)"
            )
        elif counts == round_robin.tolist():
            message = (
                "you gave expert e to rank e % world_size; experts are sharded in contiguous "
                f"runs: rank r owns experts [r·{local}, (r+1)·{local})"
            )
        elif sum(counts) != tokens * k:
            message = (
                f"your counts add up to {sum(counts)}; every one of the T·K = {tokens * k} "
                "(token, expert) pairs is sent exactly once"
            )
        else:
            message = f"counts {counts}, expected {ref}"
        raise ExerciseError(message + where, hint=HINT, seed=seed)
    passed(
        f"dispatch send counts match ExpertParallelDispatcher's plan on all {len(CASES)} layouts"
    )
