"""``bench train``: one training step of ours against transformers' DeepseekV3, same config,
same run — tokens/s, kernel launches per step and model FLOPs utilisation (MFU).

A step is forward, loss, backward and AdamW (``build_optimizer``'s, for both models), under
bf16 autocast on a GPU, fp32 on the CPU. Rows:

* ``matmul n³`` — a large bf16 (GPU) or fp32 (CPU) matrix product: the MFU denominator, so the
  ratio holds for this machine, not for a datasheet;
* ``train transformers`` — ``DeepseekV3ForCausalLM`` built from our config with MTP off (it
  has no MTP), sdpa attention and its ``grouped_mm`` experts where the installed version has
  them (else its default); its own loss (``labels=``), the way a user would train it;
* ``train ours`` — MTP off too: the like-for-like row, and the ratio ours / transformers;
* ``train ours +MTP`` — the preset as the report trains it, with its MTP module;
* ``train ours eager`` — where ``train`` compiles the layers (CUDA: ``TrainConfig.compiles``),
  the same step without compiling, to show what it buys. The ours rows take the path ``train``
  takes.

Kernel launches per step come from ``torch.profiler`` over one step: CUDA kernels on a GPU
(launch counts bound small models), ``aten::`` operator calls on the CPU, which has no kernels.
``recompiles`` counts the graphs torch.compile built while the step was timed: 0 when nothing
is compiled, and it must stay 0 as expert loads change from step to step.

Model FLOPs per token, as the PaLM appendix counts them: 6 × the parameters a token uses in
matrix products (activated experts only; the embedding lookup is not a product) plus the
attention scores and values, 6 × layers × heads × (d_qk + d_v) × T / 2 under a causal mask
(the /2: on average a token attends to half the window). An MTP module counts as one more
layer, and its output head as one more head.

Shapes: the ``small`` preset at 8 × 2048 tokens on a GPU (``--preset medium`` for the 1–2B
model), ``tiny`` at 16 × 128 on the CPU; ``quick`` shrinks the batch for smoke runs.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable

import torch

from ..accounting import count_parameters
from ..config import ModelConfig, preset
from ..model import DeepSeekV3
from ..train.config import TrainConfig
from ..train.optim import build_optimizer
from .harness import Results, Row, median_ms


def run(device: torch.device, quick: bool, preset_name: str | None = None) -> Results:
    """The matmul ceiling, then transformers, ours and ours with MTP on one preset."""
    gpu = device.type == "cuda"
    name = preset_name or ("small" if gpu else "tiny")
    batch, seq = (8, 2048) if gpu else (16, 128)
    if quick:
        batch, seq = (2, 256) if gpu else (2, 32)
    config = preset(name)
    shape = f"{name} {batch}x{seq}"
    res = Results()
    peak = _matmul_row(res, device, quick)
    cfg = TrainConfig(preset=name, batch_size=batch, seq_len=seq, device=device.type)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    no_mtp = config.replace(num_nextn_predict_layers=0)
    res.rows.append(_transformers_row(no_mtp, ids, cfg, device, quick, shape, peak))
    _free(device)
    runs = [("train ours", no_mtp, cfg.compiles()), ("train ours +MTP", config, cfg.compiles())]
    if cfg.compiles():  # what compiling the layers buys: the same step, eager
        runs.append(("train ours eager", no_mtp, False))
    for label, model_config, compiled in runs:
        row = _ours_row(label, model_config, ids, cfg, device, quick, shape, peak, compiled)
        res.rows.append(row)
        _free(device)
    res.ratio("ours / transformers (MTP off)", "train ours", "train transformers")
    res.ratio("ours +MTP / transformers (MTP off)", "train ours +MTP", "train transformers")
    return res


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one training token (main model and MTP modules)."""
    pc = count_parameters(config)
    dense = pc.activated_sum + pc.mtp_activated
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    heads = config.num_attention_heads
    attention = layers * heads * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
    mtp_heads = config.num_nextn_predict_layers * config.hidden_size * config.vocab_size
    return 6 * (dense + mtp_heads + attention)


# ---------------------------------------------------------------------------------- rows
def _matmul_row(res: Results, device: torch.device, quick: bool) -> float:
    """Time an n³ matmul in the step's compute dtype; returns its FLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, quick)
    tflops = 2 * n**3 / ms / 1e9
    note = f"{str(dtype).removeprefix('torch.')}: the MFU denominator"
    res.rows.append(Row(f"matmul {n}³", f"{n}x{n}x{n}", ms, tflops, "TFLOP/s", note))
    return tflops * 1e12


def _ours_row(label, config, ids, cfg, device, quick, shape, peak, compiled) -> Row:
    """Our model, built on the device, one step = forward with losses, backward, AdamW; its
    layers compiled as ``train`` compiles them (``compiled``)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekV3(config).train()
    if compiled:
        model.compile_layers()
    opt = build_optimizer(model, cfg)
    x, y = ids[:, :-1], ids[:, 1:]
    loss_args = {**cfg.loss_args(), "mtp": config.num_nextn_predict_layers > 0}

    def loss() -> torch.Tensor:
        return model(x, labels=y, **loss_args).loss

    note = "MTP on" if config.num_nextn_predict_layers else "MTP off"
    note += ", compiled layers" if compiled else ", eager"
    return _timed_step(label, loss, opt, config, ids, device, quick, shape, peak, note)


def _transformers_row(config, ids, cfg, device, quick, shape, peak) -> Row:
    """transformers' DeepseekV3ForCausalLM on the same config; skipped if not installed."""
    label = "train transformers"
    try:
        import transformers
    except ImportError:
        return Row(label, shape, None, None, "tokens/s", "skipped: transformers not installed")
    kwargs = {"attn_implementation": "sdpa"}
    try:  # transformers versions with pluggable experts: take its fastest, as a user would
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        ALL_EXPERTS_FUNCTIONS = {}
    if "grouped_mm" in ALL_EXPERTS_FUNCTIONS:
        kwargs["experts_implementation"] = "grouped_mm"
    hf_config = transformers.DeepseekV3Config(**config.to_dict(), **kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.DeepseekV3ForCausalLM(hf_config).train()
    opt = build_optimizer(hf, cfg)
    x = ids[:, :-1]

    def loss() -> torch.Tensor:
        return hf(input_ids=x, labels=x, use_cache=False).loss  # shifts the labels itself

    experts = getattr(hf.config, "_experts_implementation", None) or "its default"
    note = (
        f"transformers {transformers.__version__}, attn {hf.config._attn_implementation}, "
        f"experts {experts}, MTP off"
    )
    return _timed_step(label, loss, opt, config, ids, device, quick, shape, peak, note)


def _timed_step(label, loss, opt, config, ids, device, quick, shape, peak, note) -> Row:
    """Warm up, count one step's launches, time the step; the row carries tokens/s and MFU."""
    gpu = device.type == "cuda"

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    step()  # first step: AdamW's state, lazy initialisation, autotuning
    launches, unit = count_launches(step, device)
    graphs = _graphs_compiled()
    ms = median_ms(step, device, quick)
    recompiles = _graphs_compiled() - graphs
    batch, seq = ids.shape[0], ids.shape[1] - 1
    tokens_per_s = batch * seq / ms * 1e3
    flops = train_flops_per_token(config, seq)
    mfu = tokens_per_s * flops / peak
    extra = {
        "mfu": mfu,
        "launches_per_step": launches,
        "launch_unit": unit,
        "recompiles": recompiles,
        "flops_per_token": flops,
        "dtype": "bf16 autocast" if gpu else "float32",
    }
    note = (
        f"{note}; MFU {mfu:.1%}; {launches:,} {unit}/step; recompiles {recompiles}; "
        f"{flops / 1e6:,.1f} MFLOP/token"
    )
    return Row(label, shape, ms, tokens_per_s, "tokens/s", note, extra)


# ---------------------------------------------------------------------------------- probes
def count_launches(step: Callable[[], None], device: torch.device) -> tuple[int, str]:
    """What one call of ``step`` launches, from torch.profiler: CUDA kernels on a GPU (memory
    copies and sets excluded), ``aten::`` operator calls on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    if cuda:
        kernels = [
            e
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not e.name.startswith(("Memcpy", "Memset"))
        ]
        return len(kernels), "kernels"
    return sum(e.name.startswith("aten::") for e in events), "aten ops"


def _graphs_compiled() -> int:
    """Graphs torch.compile (dynamo) has built in this process; 0 if it never ran."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def _free(device: torch.device) -> None:
    """Give the finished row's model and optimizer state back before the next row builds one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
