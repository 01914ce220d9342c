"""Every place that quantizes goes through ``dsv3lite.fp8``: the checkpoint writer, the
expert-parallel FP8 dispatch and the numerics study give the bytes ``act_quant`` /
``weight_quant`` give, on fresh random inputs with the cases quantizers used to disagree on:
an all-zero tile, ±Inf, NaN, and dimensions that are not multiples of 128.
"""

import random

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dsv3lite import DeepSeekV3, ModelConfig, save_pretrained
from dsv3lite.checkpoint import SCALE_SUFFIX
from dsv3lite.fp8 import FP8, act_dequant, act_quant, weight_dequant, weight_quant
from dsv3lite.fp8 import numerics as nm
from dsv3lite.parallel.expert_parallel import all_to_all

TINY = dict(
    vocab_size=256,
    hidden_size=192,
    intermediate_size=200,
    moe_intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=160,
    kv_lora_rank=96,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=64,
)  # fmt: skip  (192, 200, 72, 160: ragged against 128)


def fresh_seed() -> int:
    return random.randrange(2**31)


def awkward(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random values over 12 decades, the first 128 columns of rows 0-1 zero (of rows 0-127
    when there are that many: a zero 128×128 block), a NaN, +Inf and -Inf."""
    g = torch.Generator().manual_seed(seed)
    decades = torch.logspace(-6, 6, shape[1])[torch.randperm(shape[1], generator=g)]
    x = torch.randn(shape, generator=g) * decades
    x[: 128 if shape[0] > 128 else 2, :128] = 0.0
    x[2, min(130, shape[1] - 1)], x[3, -1], x[-1, 5] = float("nan"), float("inf"), float("-inf")
    return x


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_checkpoint_writer_is_weight_quant(tmp_path):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = DeepSeekV3(ModelConfig(**TINY))
    planted = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers.1." in name and name.endswith("proj.weight"):
                p.copy_(awkward(tuple(p.shape), seed + planted))
                planted += 1
    assert planted >= 3
    save_pretrained(model, tmp_path / "plain")
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    plain = load_file(tmp_path / "plain/model.safetensors")
    stored = load_file(tmp_path / "fp8/model.safetensors")
    fp8_keys = [k for k, t in stored.items() if t.dtype == FP8]
    assert any(".layers.1." in k for k in fp8_keys)
    for key in fp8_keys:
        q, s = weight_quant(plain[key])
        assert same_bytes(stored[key], q), (key, seed)
        assert torch.equal(stored[key + SCALE_SUFFIX], s), (key, seed)


@pytest.fixture
def one_rank_group():
    """A gloo group of one process: all_to_all is then a copy, through the real code path."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dispatch_is_act_quant(one_rank_group, dtype):
    seed = fresh_seed()
    x = awkward((7, 300), seed).to(dtype)
    out, pending = all_to_all(x, [7], [7], fp8=True)
    pending.wait()
    expected = act_dequant(*act_quant(x)).to(dtype)
    assert torch.equal(out.isnan(), expected.isnan()), seed
    assert torch.equal(out.nan_to_num(), expected.nan_to_num()), seed


def test_numerics_fake_quant_is_the_api():
    seed = fresh_seed()
    x = awkward((200, 300), seed)
    pairs = (("1x128", act_quant, act_dequant), ("128x128", weight_quant, weight_dequant))
    for granularity, quant, dequant in pairs:
        dequantized = dequant(*quant(x))
        got = nm.fake_quant(x, granularity)
        assert torch.equal(got.isnan(), dequantized.isnan()), (granularity, seed)
        assert torch.equal(got.nan_to_num(), dequantized.nan_to_num()), (granularity, seed)


def test_awkward_has_what_it_claims():
    x = awkward((130, 300), 0)
    q, s = act_quant(x)
    assert bool((s[:2, 0] == 1).all()) and not bool(q[:2, :128].float().any())
    assert x.isnan().sum() == 1 and x.isinf().sum() == 2
    assert weight_quant(x)[1][0, 0] == 1  # the first 128×128 block is all zeros
