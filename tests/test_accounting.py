"""The decode cost model and the roofline, against what torch counts and a hand calculation."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsv3lite.accounting import Roofline, absorbed_decode_cost
from dsv3lite.bench.mla import eager_absorbed_decode


@pytest.mark.parametrize("tokens", [1, 2])
def test_absorbed_decode_flops_are_what_the_einsums_do(tokens):
    """FLOPs: torch's own count of the absorbed step's three einsums (score on the latent,
    score on the RoPE key, latent average), on fresh random sizes; bytes: the cache tensors."""
    rng = random.Random()
    b, h, t = rng.randint(1, 3), rng.choice([2, 4, 16]), rng.randint(5, 40)
    latent, rope = rng.choice([16, 32]), rng.choice([4, 8])
    q = torch.randn(b, tokens, h, latent)
    q_pe = torch.randn(b, tokens, h, rope)
    kv, k_pe = torch.randn(b, t, latent), torch.randn(b, t, rope)
    with FlopCounterMode(display=False) as counter:
        eager_absorbed_decode(q, q_pe, kv, k_pe, 0.1)
    nbytes, flops = absorbed_decode_cost(latent, rope, h, t, b, tokens, kv.element_size())
    assert flops == counter.get_total_flops()
    assert nbytes == kv.numel() * kv.element_size() + k_pe.numel() * k_pe.element_size()


def test_the_release_shapes_intensity():
    """DeepSeek-V3 (d_c 512, d_h^R 64), bf16: 2·(2·512 + 64) = 2,176 FLOPs per head per 1,152
    cache bytes, whatever the batch and context."""
    for batch, context in [(1, 1), (64, 4096)]:
        nbytes, flops = absorbed_decode_cost(512, 64, 128, context, batch)
        assert flops / nbytes == pytest.approx(128 * 2176 / 1152)


def test_roofline():
    roof = Roofline(flops=800e12, bytes_per_s=4e12)
    assert roof.ridge == 200
    assert roof.attainable(10) == 40e12 and roof.attainable(1000) == 800e12
    assert roof.seconds(4e12, 1.0) == 1.0 and roof.seconds(1.0, 1600e12) == 2.0
    results = {"ceilings": {"gemm_tflops": 700.0, "copy_gbs": 4000.0}, "env": {"device": "X"}}
    assert Roofline.from_results(results) == Roofline(700e12, 4000e9, "X")
