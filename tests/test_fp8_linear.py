"""FP8Linear (report Figure 6) and the §3.3.1 recipe: forward and both gradients against an
explicit emulation (≤ 1e-5) and against a float64 nn.Linear (a few 1e-2); padding of sizes
that are not multiples of 128; ``to_fp8`` on the tiny model: what it converts, keys unchanged,
the absorbed MLA path, and training; the Triton path through the interpreter (subprocess)."""

import pytest
import torch
import torch.nn.functional as F
from test_fp8_quant import (  # one_thread: an autouse fixture
    INTERPRETED,
    cuda,
    interpreted,
    one_thread,  # noqa: F401
    run_interpreted,
)
from torch import nn

from dsv3lite import DeepSeekV3, preset
from dsv3lite.fp8 import FP8Linear, to_fp8
from dsv3lite.fp8.linear import fp8_linear
from dsv3lite.fp8.recipe import ATTENTION_PROJECTIONS, MLP_PROJECTIONS
from dsv3lite.kernels import fp8_quant as fq
from dsv3lite.model.experts import Experts


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_interpreter_subprocess():
    run_interpreted(__file__)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def pad(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor along ``dims`` to multiples of 128."""
    p = [0, 0, 0, 0]
    for d in dims:
        p[1 if d == 1 else 3] = -t.shape[d] % 128
    return F.pad(t, p)


def emulate(x2: torch.Tensor, w: torch.Tensor, dy2: torch.Tensor):
    """Figure 6 written out with the reference quantizers and float64 products:
    y = Q(x) Q(W)ᵀ, dx = Q(dy) Q(W), dW = Q₁₂₈ₓ₁(dy)ᵀ Q₁₂₈ₓ₁(x) (tokens padded to 128)."""
    n, k = w.shape
    m_pad = -x2.shape[0] % 128
    xd = fq.act_dequant(*fq.act_quant_ref(x2)).double()
    wd = fq.weight_dequant(*fq.weight_quant_ref(w)).double()
    dyd = fq.act_dequant(*fq.act_quant_ref(dy2)).double()
    dyt = fq.act_dequant(*fq.act_quant_ref(F.pad(dy2, (0, 0, 0, m_pad)).t())).double()
    xt = fq.act_dequant(*fq.act_quant_ref(F.pad(x2, (0, 0, 0, m_pad)).t())).double()
    return xd @ wd.t(), dyd @ wd, dyt @ xt.t()


def run_layer(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad


@pytest.mark.parametrize("d_in, d_out", [(96, 200), (256, 128), (32, 64)])
def test_matches_explicit_emulation(d_in, d_out):
    torch.manual_seed(0)
    layer = FP8Linear(d_in, d_out)
    x, dy = torch.randn(2, 37, d_in), torch.randn(2, 37, d_out)
    y, dx, dw = run_layer(layer, x, dy)
    y_e, dx_e, dw_e = emulate(x.view(-1, d_in), layer.weight.detach(), dy.view(-1, d_out))
    assert y.shape == (2, 37, d_out) and dx.shape == x.shape and dw.shape == (d_out, d_in)
    assert rel(y.view(-1, d_out), y_e) <= 1e-5
    assert rel(dx.view(-1, d_in), dx_e) <= 1e-5
    assert rel(dw, dw_e) <= 1e-5
    assert dw.dtype == torch.float32


def test_padding_changes_nothing():
    """Zeros contribute nothing and never raise an amax: a 96-wide layer is the 128-wide layer
    with zero columns, exactly."""
    torch.manual_seed(0)
    small, big = FP8Linear(96, 80), FP8Linear(128, 128)
    with torch.no_grad():
        big.weight.zero_()
        big.weight[:80, :96] = small.weight
    x, dy = torch.randn(50, 96), torch.randn(50, 80)
    y, dx, dw = run_layer(small, x, dy)
    y2, dx2, dw2 = run_layer(big, pad(x, 1), pad(dy, 1))
    assert torch.equal(y, y2[:, :80]) and torch.equal(dx, dx2[:, :96])
    assert torch.equal(dw, dw2[:80, :96])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_nn_linear(dtype):
    torch.manual_seed(0)
    layer = FP8Linear(384, 256, bias=True)
    ref = nn.Linear(384, 256, bias=True).double()
    ref.load_state_dict(layer.state_dict())
    x, dy = torch.randn(300, 384).to(dtype), torch.randn(300, 256).to(dtype)
    y, dx, dw = run_layer(layer, x, dy)
    y_r, dx_r, dw_r = run_layer(ref, x.double(), dy.double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert rel(y, y_r) < 0.05 and rel(dx, dx_r) < 0.05 and rel(dw, dw_r) < 0.05
    assert rel(layer.bias.grad, ref.bias.grad) < 1e-2


def test_drop_in_for_nn_linear():
    lin = nn.Linear(64, 32, bias=True)
    layer = FP8Linear.from_linear(lin, scale_fmt="ue8m0")
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert isinstance(layer, nn.Linear) and "scale_fmt=ue8m0" in repr(layer)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(8, 64)
    assert rel(layer(x), lin(x)) < 0.05
    with torch.no_grad():  # inference: Fprop only, the same result
        assert torch.equal(layer(x), layer.forward(x.requires_grad_()).detach())
    y = layer(torch.randn(0, 64))
    assert y.shape == (0, 32)
    y.sum().backward()
    assert lin.weight.grad is not None and not lin.weight.grad.any()
    with pytest.raises(ValueError, match="scale_fmt"):
        FP8Linear(64, 32, scale_fmt="e5m2")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        layer(x.double())


def test_bf16_master_weights_get_bf16_gradients():
    layer = FP8Linear(128, 64, dtype=torch.bfloat16)
    x, dy = torch.randn(4, 128, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    _, dx, dw = run_layer(layer, x, dy)
    assert dw.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the recipe
def tiny(**overrides) -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(preset("tiny", **overrides))


def test_to_fp8_converts_the_report_s_gemms_only():
    model = tiny()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    assert to_fp8(model) is model
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {n.rsplit(".", 1)[1] for n in fp8} == set(ATTENTION_PROJECTIONS + MLP_PROJECTIONS) - {
        "q_proj"
    }
    assert plain == {"lm_head"} | {f"model.mtp.{k}.eh_proj" for k in range(1)}
    assert any(".shared_experts." in n for n in fp8) and not any(".experts." in n for n in plain)
    experts = [m for m in model.modules() if isinstance(m, Experts)]  # stacked: no Linear
    assert experts and all(m.linear.func is fp8_linear for m in experts)
    assert any(n.startswith("model.mtp.") for n in fp8)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # shared, not copied
    assert to_fp8(model) is model and len(fp8) == sum(
        isinstance(m, FP8Linear) for m in model.modules()
    )


def test_to_fp8_without_query_compression_and_both_mla_paths():
    """Both MLA paths run after to_fp8 (absorb reads kv_b_proj.weight, still a plain fp32
    Parameter) and stay within FP8's error of the unconverted model (~3% per FP8 GEMM, a few
    GEMMs deep)."""
    ref = tiny(q_lora_rank=None).eval()
    model = to_fp8(tiny(q_lora_rank=None)).eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, FP8Linear)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(ids).logits
        naive = model(ids).logits
        model.attn_impl = "absorb"
        absorbed = model(ids).logits
    assert rel(naive, expected) < 0.15 and rel(absorbed, expected) < 0.15


def test_to_fp8_trains_on_the_cpu():
    """A few AdamW steps on one batch: the loss falls, and it starts where fp32's starts."""
    model, ref = tiny(num_hidden_layers=2), tiny(num_hidden_layers=2)
    to_fp8(model)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)
    )

    def loss_of(m: DeepSeekV3) -> torch.Tensor:
        logits = m(ids[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    with torch.no_grad():
        assert abs(loss_of(model).item() - loss_of(ref).item()) < 0.05
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------- Triton path
def check_triton_path(device: str) -> None:
    """The same layer through the Triton kernels and through the torch reference."""
    torch.manual_seed(0)
    layer = FP8Linear(96, 200).to(device)
    x, dy = torch.randn(130, 96, device=device), torch.randn(130, 200, device=device)
    y, dx, dw = run_layer(layer, x, dy)
    layer.weight.grad = None
    y_e, dx_e, dw_e = emulate(x.cpu(), layer.weight.detach().cpu(), dy.cpu())
    # GPU: the tensor cores' narrower in-block accumulator (see tests/test_fp8_gemm.py)
    tol = 1e-5 if device == "cpu" else 5e-4
    assert rel(y.cpu(), y_e) <= tol and rel(dx.cpu(), dx_e) <= tol and rel(dw.cpu(), dw_e) <= tol


@interpreted
def test_triton_fp8_linear_matches_emulation():
    check_triton_path("cpu")


@pytest.mark.gpu
@cuda
def test_gpu_fp8_linear_matches_emulation():
    check_triton_path("cuda")
