"""``python -m dsv3lite bench train``: training tokens/s and model FLOPs utilisation (MFU).

One optimizer step (forward with MTP, backward, AdamW) of the ``tiny`` preset in fp32 on the
CPU, or of ``small`` under bf16 autocast on a GPU. MFU = model FLOPs per second over the rate
of a large bf16 (GPU) or fp32 (CPU) matrix product measured in the same run, so the ratio
holds for this machine, not for a datasheet.

Model FLOPs per token, as the PaLM appendix counts them: 6 × the parameters a token uses in
matrix products (activated experts only; the embedding lookup is not a product) plus the
attention scores and values, 6 × layers × heads × (d_qk + d_v) × T / 2 under a causal mask
(the /2: on average a token attends to half the window). The MTP module counts as one more
layer, as it runs in every step.
"""

from __future__ import annotations

import torch

from ..accounting import count_parameters
from ..bench import Row, Suite, median_ms
from ..config import ModelConfig, preset
from ..model import DeepSeekV3
from .config import TrainConfig
from .optim import build_optimizer


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one training token (main model and MTP modules)."""
    pc = count_parameters(config)
    dense = pc.activated_sum + pc.mtp_activated
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    heads = config.num_attention_heads
    attention = layers * heads * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
    mtp_heads = config.num_nextn_predict_layers * config.hidden_size * config.vocab_size
    return 6 * (dense + mtp_heads + attention)


def bench_train(device: torch.device, quick: bool) -> Suite:
    """Tokens/s of a training step and its MFU, beside the matrix-product rate."""
    gpu = device.type == "cuda"
    name = "small" if gpu else "tiny"
    batch, seq = (8, 2048) if gpu else (16, 128)
    if quick:
        batch, seq = 2, 64
    config = preset(name)
    suite = Suite()
    matmul_dtype = torch.bfloat16 if gpu else torch.float32
    n = 256 if quick else (8192 if gpu else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=matmul_dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, quick)
    peak = 2 * n**3 / ms * 1e3
    suite.rows.append(
        Row(
            f"matmul {n}³",
            f"{n}x{n}x{n}",
            str(matmul_dtype)[6:],
            ms,
            None,
            f"{_rate(peak)}: the MFU denominator",
        )  # fmt: skip
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepSeekV3(config).train()
    cfg = TrainConfig(preset=name, batch_size=batch, seq_len=seq, device=device.type)
    opt = build_optimizer(model, cfg)
    x, y = (torch.randint(0, config.vocab_size, (batch, seq), device=device) for _ in range(2))

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            loss = model(x, labels=y, **cfg.loss_args()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = median_ms(step, device, quick)
    tokens_per_s = batch * seq / ms * 1e3
    mfu = tokens_per_s * train_flops_per_token(config, seq) / peak
    dtype = "bf16 autocast" if gpu else "float32"
    suite.rows.append(
        Row(
            "train step",
            f"{name} {batch}x{seq}",
            dtype,
            ms,
            tokens_per_s,
            f"MFU {mfu:.1%} ({train_flops_per_token(config, seq) / 1e6:.1f} MFLOP/token)",
        )  # fmt: skip
    )
    return suite


def _rate(flops_per_s: float) -> str:
    return (
        f"{flops_per_s / 1e12:.1f} TFLOP/s"
        if flops_per_s > 1e12
        else f"{flops_per_s / 1e9:.1f} GFLOP/s"
    )
