"""Two-micro-batch overlap on 4 gloo processes: the same result as without it (forward and
backward) and as the single-process layer; the timeline shows communication under compute."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.distributed as dist

from dsv3lite.config import preset
from dsv3lite.model.block import DecoderLayer
from dsv3lite.model.rope import RotaryEmbedding
from dsv3lite.parallel.expert_parallel import shard_moe
from dsv3lite.parallel.launch import launch
from dsv3lite.parallel.overlap import Interval, Timeline
from dsv3lite.parallel.pipeline import causal_inputs
from dsv3lite.testing.ep import measure_overlap


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _grad_worker(seed: int) -> dict:
    """Overlapped and sequential forward+backward of one EP layer: outputs and gradients."""
    config = preset("tiny")
    torch.manual_seed(seed)
    layer = DecoderLayer(config, 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.05)
    x_all = torch.randn(dist.get_world_size() * 2, 16, config.hidden_size)
    x = x_all[2 * dist.get_rank() :][:2]
    probe = torch.randn_like(x)
    cos, sin, mask = causal_inputs(RotaryEmbedding(config), 16, x.device)
    out = {}
    for overlap in (False, True):
        ep = copy.deepcopy(layer)
        shard_moe(ep.mlp, overlap=overlap)
        xs = x.clone().requires_grad_()
        y, _ = ep(xs, cos, sin, mask)
        (y * probe).sum().backward()
        grads = {n: p.grad.clone() for n, p in ep.named_parameters() if p.grad is not None}
        out[overlap] = (y.detach(), xs.grad, grads)
    reference = layer(x, cos, sin, mask)[0].detach()
    (y0, gx0, g0), (y1, gx1, g1) = out[False], out[True]
    return {
        "vs_reference": rel(y1, reference),
        "y": rel(y1, y0),
        "x_grad": rel(gx1, gx0),
        "param_grads": max(rel(g1[n], g0[n]) for n in g0),
        "same_params": sorted(g0) == sorted(g1),
    }


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_overlap_equals_no_overlap_forward_and_backward():
    for res in launch(_grad_worker, 4, 0, timeout_s=90):
        assert res["same_params"]
        assert res["vs_reference"] < 1e-5, res
        assert res["y"] < 1e-6 and res["x_grad"] < 1e-6 and res["param_grads"] < 1e-6, res


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_timeline_shows_hidden_communication():
    results = launch(measure_overlap, 4, 2, 32, 3, 0, timeout_s=90)
    for res in results:
        for mode in ("sequential", "overlapped"):
            assert res[mode]["error"] < 1e-5, (mode, res[mode]["error"])
            names = {(iv.kind, iv.name) for iv in res[mode]["timeline"]}
            assert {("comm", "dispatch"), ("comm", "combine"), ("compute", "experts")} <= names
        # awaited at once, nothing can hide a collective
        assert res["sequential"]["hidden_fraction"] == 0.0
    # overlapped: some communication ran under compute (how much depends on the machine)
    assert statistics.median(r["overlapped"]["hidden_fraction"] for r in results) > 0.0


def test_hidden_fraction_arithmetic():
    tl = Timeline()
    tl.intervals += [
        Interval("compute", "attention", 0, 0.0, 2.0),
        Interval("compute", "experts", 0, 3.0, 4.0),
        Interval("comm", "dispatch", 0, 1.0, 3.5),  # 1.0 of 2.5 under attention, 0.5 under experts
        Interval("comm", "combine", 1, 3.0, 3.5),  # inside the dispatch: the union counts it once
    ]
    assert tl.hidden_fraction() == pytest.approx(1.5 / 2.5)
    assert tl.totals()["comm_s"] == pytest.approx(2.5)
    assert tl.totals()["wall_s"] == pytest.approx(4.0)
