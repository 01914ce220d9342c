"""Expert parallelism on real gloo process groups: equal to the single-process MoE, forward and
backward, for EP = 2 and 4 (also as sub-groups); FP8 dispatch; node-limited routing; bad input;
a dead or hung rank makes the others fail fast."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist

from dsv3lite import DeepSeekV3
from dsv3lite.config import preset
from dsv3lite.model.moe import MoE
from dsv3lite.parallel.expert_parallel import (
    reduce_gradients,
    shard_moe,
    shard_moe_layers,
    sharded_experts,
)
from dsv3lite.parallel.launch import RankFailure, init_distributed, launch

TOKENS_PER_RANK = 24


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _reference_moe(config, seed: int) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
        moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return moe


def _ep_case(overrides: dict, seed: int, ep_groups: list[list[int]] | None) -> dict:
    """On every rank: the full MoE as reference, then this rank's EP shard on its tokens."""
    config = preset("tiny", **overrides)
    rank, world = dist.get_rank(), dist.get_world_size()
    group, members = None, list(range(world))
    for ranks in ep_groups or []:  # every rank creates every group, in the same order
        g = dist.new_group(ranks)
        if rank in ranks:
            group, members = g, ranks
    moe = _reference_moe(config, seed)
    x = torch.randn(world * TOKENS_PER_RANK, config.hidden_size)
    probe = torch.randn_like(x)  # loss = Σ y · probe: every output element gets a gradient
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

    # reference: the tokens of this EP group on one MoE
    rows = torch.cat(
        [torch.arange(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK) for r in members]
    )
    ref_y, _ = moe(x[rows])
    (ref_y * probe[rows]).sum().backward()
    ref_y = ref_y.detach()[members.index(rank) * TOKENS_PER_RANK :][:TOKENS_PER_RANK]

    out = {}
    for tag, fp8, overlap in (("fp32", False, False), ("fp8", True, False), ("ovl", False, True)):
        ep = copy.deepcopy(moe)
        ep.zero_grad(set_to_none=True)
        dispatcher = shard_moe(ep, group, fp8_dispatch=fp8, overlap=overlap)
        own = slice(dispatcher.first_expert, dispatcher.first_expert + dispatcher.n_local)
        # only this rank's slice of the stacked experts is kept
        assert ep.experts.gate_up_proj.equal(moe.experts.gate_up_proj[own])
        assert ep.experts.down_proj.equal(moe.experts.down_proj[own])
        xs = x[mine].clone().requires_grad_()
        y, routing = ep(xs)
        (y * probe[mine]).sum().backward()
        for p in list(ep.gate.parameters()) + list(ep.shared_experts.parameters()):
            dist.all_reduce(p.grad, group=group)  # replicated: data-parallel sum
        out[f"{tag}_y"] = rel(y.detach(), ref_y)
        out[f"{tag}_expert_grad"] = max(
            rel(p.grad, q.grad[own])
            for p, q in zip(ep.experts.parameters(), moe.experts.parameters())
        )
        out[f"{tag}_gate_grad"] = rel(ep.gate.weight.grad, moe.gate.weight.grad)
        out[f"{tag}_shared_grad"] = max(
            rel(p.grad, q.grad)
            for p, q in zip(ep.shared_experts.parameters(), moe.shared_experts.parameters())
        )
        out["ranks_reached"] = int(dispatcher.ranks_reached(routing).max())
        out["ep_size"] = dispatcher.ep_size
    return out


def _ep_worker(cases: list[tuple]) -> list[dict]:
    return [_ep_case(overrides, 0, groups) for overrides, groups in cases]


CASES = {
    2: [({"n_group": 2, "topk_group": 1}, None)],  # one group per rank: a token reaches 1 rank
    4: [
        ({}, None),  # n_group = EP = 4, topk_group = 2
        ({}, [[0, 1], [2, 3]]),  # two EP groups of 2 inside 4 ranks
    ],
}


@pytest.fixture(scope="module")
def ep_runs() -> dict:
    """One launch per world size runs all its cases (a process's first GEMMs are slow)."""
    return {world: launch(_ep_worker, world, cases, timeout_s=90) for world, cases in CASES.items()}


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world, case", [(w, i) for w in CASES for i in range(len(CASES[w]))])
def test_ep_matches_single_process_moe(ep_runs, world, case):
    overrides, groups = CASES[world][case]
    topk_group = preset("tiny", **overrides).topk_group
    for r, per_rank in enumerate(ep_runs[world]):
        res = per_rank[case]
        assert res["ep_size"] == (2 if groups else world)
        for tag in ("fp32", "ovl"):  # ovl: the two-micro-batch overlap
            assert res[f"{tag}_y"] < 1e-5, (r, tag, res)
            assert res[f"{tag}_expert_grad"] < 1e-5, (r, tag, res)
            assert res[f"{tag}_gate_grad"] < 1e-5, (r, tag, res)
            assert res[f"{tag}_shared_grad"] < 1e-5, (r, tag, res)
        # FP8 dispatch: e4m3 has a 3-bit mantissa, 1x128 scales keep the error a few percent
        assert 1e-4 < res["fp8_y"] < 5e-2, (r, res)
        assert res["fp8_expert_grad"] < 1e-1, (r, res)
        assert res["ranks_reached"] <= topk_group, (r, res)


def _config_worker(bad_rank: int) -> None:
    overrides = {"moe_intermediate_size": 32} if dist.get_rank() == bad_rank else {}
    moe = _reference_moe(preset("tiny", **overrides), 0)
    shard_moe(moe)


def _indivisible_worker() -> None:
    shard_moe(_reference_moe(preset("tiny"), 0))


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_bad_input_fails_on_every_rank():
    with pytest.raises(RankFailure) as info:
        launch(_indivisible_worker, 3, timeout_s=30)  # 16 experts over 3 ranks
    assert sorted(info.value.failures) == [0, 1, 2]
    assert all(
        "divisible by the expert-parallel size (3)" in m for m in info.value.failures.values()
    )

    with pytest.raises(RankFailure) as info:
        launch(_config_worker, 2, 1, timeout_s=30)
    assert sorted(info.value.failures) == [0, 1]
    assert all("ModelConfig differs across ranks" in m for m in info.value.failures.values())


def _dying_worker(mode: str) -> None:
    if dist.get_rank() == 1:
        if mode == "exit":
            os._exit(3)  # dies without a word
        time.sleep(60)  # alive but never joins the collective
    dist.all_reduce(torch.ones(4))


@pytest.mark.distributed
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_hung_rank_fails_fast(mode):
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        launch(_dying_worker, 3, mode, timeout_s=50, pg_timeout_s=2)
    elapsed = time.monotonic() - start
    failures = info.value.failures
    assert sorted(failures) == [0, 1, 2], failures
    assert elapsed < 15, f"took {elapsed:.1f} s to fail"
    for r in (0, 2):
        assert "another rank died or stopped participating" in failures[r], failures[r]
    assert ("exited with code 3" if mode == "exit" else "killed") in failures[1]


def _info_worker() -> tuple:
    info = init_distributed()  # already joined by launch: returns where this rank stands
    return info.rank, info.world_size, info.local_rank, info.backend, os.environ["MASTER_ADDR"]


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_launch_sets_torchrun_environment():
    assert launch(_info_worker, 2, timeout_s=30) == [
        (0, 2, 0, "gloo", "127.0.0.1"),
        (1, 2, 1, "gloo", "127.0.0.1"),
    ]


def test_init_distributed_names_missing_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"missing: \['WORLD_SIZE', 'LOCAL_RANK'"):
        init_distributed()


def _model_worker(seed: int) -> dict:
    """A whole tiny model with its MoE layers sharded: the mean loss over both ranks' batches
    and its gradients equal one process on the whole batch."""
    config = preset("tiny", num_hidden_layers=2)
    torch.manual_seed(seed)
    model = DeepSeekV3(config)
    ids = torch.randint(0, config.vocab_size, (2 * dist.get_world_size(), 17))
    reference = copy.deepcopy(model)
    loss_fn = torch.nn.functional.cross_entropy
    ref_loss = loss_fn(reference(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    ref_loss.backward()

    shards = shard_moe_layers(model)
    mine = ids[2 * dist.get_rank() :][:2]
    loss = loss_fn(model(mine[:, :-1]).logits.flatten(0, 1), mine[:, 1:].flatten())
    loss.backward()
    reduce_gradients(model)
    dist.all_reduce(loss)
    # a sharded stack holds experts first_expert … of the reference's stack
    sharded = sharded_experts(model)
    ref = dict(reference.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        r = ref[name].grad
        r = torch.zeros_like(ref[name]) if r is None else r  # unused on one process (e.g. MTP)
        if name in sharded:
            r = r[sharded[name].first_expert :][: sharded[name].n_local]
        worst = max(worst, ((p.grad - r).norm() / r.norm().clamp_min(1e-12)).item())
    return {
        "loss": loss.item() / dist.get_world_size(),
        "ref_loss": ref_loss.item(),
        "worst": worst,
        "shards": len(shards),
    }


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_sharded_model_trains_like_one_process():
    for res in launch(_model_worker, 2, 0, timeout_s=50):
        assert res["shards"] == 2  # layer 1 and the MTP module's layer (layer 0 is dense)
        assert abs(res["loss"] - res["ref_loss"]) < 1e-5 * res["ref_loss"]
        assert res["worst"] < 1e-5, res
