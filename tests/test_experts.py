"""Stacked experts and the local dispatch: every ``moe_impl`` against a per-pair fp64 loop,
forward and backward (inputs, both expert stacks, the router); one copy of the experts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import per_pair_moe

from dsv3lite import DeepSeekV3
from dsv3lite.config import preset
from dsv3lite.fp8 import to_fp8
from dsv3lite.kernels._triton import AVAILABLE as TRITON_AVAILABLE
from dsv3lite.model.experts import MOE_IMPLS, Experts
from dsv3lite.model.moe import MoE
from dsv3lite.testing import rel_err

TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
CPU_GROUPED_MM = hasattr(torch, "_grouped_mm") and TORCH >= (2, 10)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(preset("tiny", **overrides))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
        moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return moe


def _forward_backward(moe: MoE, x: torch.Tensor, probe: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y, _ = moe(x)
    (y * probe).sum().backward()
    grads = {n: p.grad for n, p in moe.named_parameters()}
    return {"y": y.detach(), "x": x.grad, **grads}


@pytest.mark.parametrize(
    "impl",
    [
        "local",
        pytest.param(
            "grouped_mm",
            marks=pytest.mark.skipif(
                not CPU_GROUPED_MM, reason="torch._grouped_mm has a CPU kernel from torch 2.10"
            ),
        ),
    ],
)
def test_dispatch_matches_a_per_pair_fp64_loop(impl):
    moe = _moe(seed=1)
    moe.experts.impl = impl
    ref = copy.deepcopy(moe).double()
    x = torch.randn(40, moe.config.hidden_size)
    probe = torch.randn_like(x)
    out = _forward_backward(moe, x, probe)

    xr = x.double().requires_grad_()
    (per_pair_moe(ref, xr) * probe.double()).sum().backward()
    expected = {"y": per_pair_moe(ref, x.double()).detach(), "x": xr.grad}
    expected.update((n, p.grad) for n, p in ref.named_parameters())
    assert set(out) == set(expected)
    for name, value in out.items():
        assert rel_err(value, expected[name]) < 1e-5, name


def test_experts_with_no_rows_get_zero_gradients():
    moe = _moe(seed=2, n_group=1, topk_group=1)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[:4] = 10.0  # every token picks experts 0-3 only
    x = torch.randn(8, moe.config.hidden_size)
    out = _forward_backward(moe, x, torch.randn_like(x))
    assert out["experts.gate_up_proj"][4:].abs().sum() == 0
    assert out["experts.gate_up_proj"][:4].abs().sum() > 0


def test_one_copy_of_the_experts():
    config = preset("tiny")
    moe = MoE(config)
    e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    experts = dict(moe.experts.named_parameters())
    assert {n: tuple(p.shape) for n, p in experts.items()} == {
        "gate_up_proj": (e, 2 * i, h),
        "down_proj": (e, h, i),
    }
    assert sum(p.numel() for p in moe.experts.parameters()) == e * 3 * h * i
    tensors = [v for v in vars(moe.experts).values() if isinstance(v, torch.Tensor)]
    assert not tensors and not list(moe.experts.buffers())  # no cached stack beside them
    moe(torch.randn(5, h))
    assert not [v for v in vars(moe.experts).values() if isinstance(v, torch.Tensor)]


def test_expert_alone_is_its_ffn():
    moe = _moe(seed=3)
    x = torch.randn(6, moe.config.hidden_size)
    i = moe.config.moe_intermediate_size
    w1, w2 = moe.experts.gate_up_proj[5], moe.experts.down_proj[5]
    expected = F.linear(F.silu(x @ w1[:i].T) * (x @ w1[i:].T), w2)
    torch.testing.assert_close(moe.experts[5](x), expected)
    assert len(moe.experts) == moe.config.n_routed_experts


def test_moe_impl_is_validated():
    experts = Experts(4, 8, 16)
    with pytest.raises(ValueError, match=r"moe_impl must be one of \('auto', 'local'"):
        experts.impl = "grouped"
    for impl in MOE_IMPLS if TRITON_AVAILABLE else set(MOE_IMPLS) - {"triton"}:
        experts.impl = impl
        assert experts.impl == impl


def test_fp8_experts_run_the_fp8_gemms_per_expert():
    """After to_fp8 every impl takes the local path with FP8's GEMMs: a few % from fp32."""
    model = DeepSeekV3(preset("tiny", num_hidden_layers=2))
    ref = copy.deepcopy(model)
    to_fp8(model)
    for moe in model.moe_layers():
        moe.experts.impl = "grouped_mm" if hasattr(torch, "_grouped_mm") else "local"
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        err = rel_err(model(ids).logits, ref(ids).logits)
    assert 0 < err < 0.1


@cuda
@pytest.mark.gpu
def test_grouped_mm_matches_local_on_the_gpu_under_autocast():
    moe = _moe(seed=4).cuda()
    ref = copy.deepcopy(moe)
    moe.experts.impl, ref.experts.impl = "grouped_mm", "local"
    x = torch.randn(4096, moe.config.hidden_size, device="cuda")
    probe = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, expected = _forward_backward(moe, x, probe), _forward_backward(ref, x, probe)
    for name, value in out.items():
        assert rel_err(value, expected[name]) < 1e-2, name


def test_checkpoint_stores_experts_one_by_one_and_loads_them_stacked(tmp_path):
    """The files keep the release's per-expert keys; loading fills the stacks, shard by shard."""
    from safetensors import safe_open

    from dsv3lite import load_pretrained, save_pretrained

    torch.manual_seed(5)
    model = DeepSeekV3(preset("tiny", num_hidden_layers=2))
    save_pretrained(model, tmp_path, max_shard_size="200KB")
    keys = set()
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    n = model.config.n_routed_experts
    for layer in (1, 2):  # the MoE layer and the MTP module, stored as layer L
        for j in range(n):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight" in keys
    assert not [k for k in keys if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    loaded = load_pretrained(tmp_path)
    for ours, theirs in zip(model.moe_layers(), loaded.moe_layers()):
        assert ours.experts.gate_up_proj.equal(theirs.experts.gate_up_proj)
        assert ours.experts.down_proj.equal(theirs.experts.down_proj)
