"""Training a DeepSeek-V3-style model: next-token + MTP losses, balancing, logging, checkpoints.

    L = L_main + λ · (1/D) Σ_k L^k_MTP (eqs. 24–25) [+ Σ_layers L_Bal (eq. 17) with aux-loss]

One optimizer step per batch; after it, the aux-loss-free bias update from that step's routing.
Everything a restart needs (weights, optimizer, step, random states) is written atomically to
``out/last`` every ``ckpt_every`` steps, so a killed run resumes where its last checkpoint left.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import load_pretrained, save_pretrained
from ..config import atomic_write_text, preset
from ..model import DeepSeekV3
from .balance import BALANCE_MODES, max_violation, sequence_balance_loss, update_bias
from .data import TokenData, load_tokenizer, read_corpus, train_tokenizer
from .plots import plot_run
from .schedule import lr_at

# Fields that may change between a run and its --resume; any other difference is refused.
RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "ckpt_every", "device", "out", "progress"}


@dataclass
class TrainConfig:
    """What a training run does; every field is a CLI flag of ``python -m dsv3lite train``."""

    preset: str = "tiny"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance: str = "aux-free"
    gamma: float = 1e-3  # bias update speed (the report: 0.001 for most of pre-training)
    alpha: float = 1e-4  # sequence-wise balance loss weight (the report: 0.0001)
    mtp_lambda: float = 0.3  # λ of eq. (25) (the report: 0.3, then 0.1)
    fp8: bool = False  # §3.3.1's recipe: attention projections and expert Linears in FP8
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    seed: int = 0
    device: str = "cpu"
    data: str | None = None
    out: str = "runs/tiny"
    progress: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Clear errors naming the field, before any work starts."""
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(
                f"TrainConfig.balance must be one of {BALANCE_MODES}, got {self.balance!r}"
            )
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("TrainConfig.device is 'cuda' but torch sees no CUDA GPU; use 'cpu'")


@dataclass
class RunResult:
    """What a finished run reports."""

    out: Path
    step: int
    val_loss: float
    unigram_entropy: float
    metrics: Path
    plots: list[Path]
    final: Path


def train(
    cfg: TrainConfig, resume: bool = False, on_log: Callable[[dict], None] | None = None
) -> RunResult:
    """Train (or resume) a run; ``on_log`` receives every logged metrics row (live plots)."""
    cfg.validate()
    out = Path(cfg.out)
    last = _existing_checkpoint(out)
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out}/last to resume from")
    if not resume and last is not None:
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    text = read_corpus(cfg.data)
    if resume:
        state = torch.load(last / "trainer_state.pt", weights_only=False)
        _check_same_run(state["train_config"], cfg)
        model = load_pretrained(last, device=cfg.device, dtype=torch.float32)
        tok = load_tokenizer(last, model.config.vocab_size)
    else:
        model_config = preset(cfg.preset, **cfg.model_overrides)
        model = DeepSeekV3(model_config).to(device)
        tok = train_tokenizer(text, model_config.vocab_size)
        state = None
    if cfg.fp8:  # parameters are shared, so checkpoints and the optimizer are unchanged
        from ..fp8 import to_fp8

        to_fp8(model)
    data = TokenData.from_text(text, tok)
    entropy = data.unigram_entropy()
    opt = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)
    out.mkdir(parents=True, exist_ok=True)

    moe_layers = model.moe_layers()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="train", unit="step")
    window_tokens, window_start = 0, time.perf_counter()
    val_loss = math.nan
    while step < cfg.steps:
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (t.to(device) for t in data.batch("train", cfg.batch_size, cfg.seq_len, gen))
        model.train()
        with autocast:
            losses = _losses(model, x, y, cfg)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loads = [moe.last_routing.load for moe in moe_layers]
        if cfg.balance == "aux-free":
            update_bias(moe_layers, loads, cfg.gamma)
        step += 1
        window_tokens += x.numel()
        bar.update(1)

        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, data, cfg, device)
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            row = _row(step, lr, losses, loads, window_tokens / elapsed, entropy)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row["val_loss"] = val_loss
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", maxvio=f"{row['maxvio']:.2f}")
            if on_log is not None:
                on_log(row)
            window_tokens, window_start = 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_checkpoint(out / "last", model, tok, opt, gen, step, cfg)
    bar.close()
    final = out / "final"
    _save_model(final, model, tok)
    plots = plot_run(metrics_path, out / "plots")
    return RunResult(out, step, val_loss, entropy, metrics_path, plots, final)


def _losses(model: DeepSeekV3, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> dict:
    """Main next-token loss, the MTP losses (eq. 24: depth k predicts y shifted by k), and the
    sequence-wise balance loss over every MoE layer when balance == 'aux-loss'."""
    logits, mtp_logits = model.forward_with_mtp(x)
    vocab = logits.shape[-1]
    main = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
    total = main
    out = {"main": main}
    if mtp_logits:
        per_depth = [
            F.cross_entropy(m.float().reshape(-1, vocab), y[:, k:].reshape(-1))
            for k, m in enumerate(mtp_logits, start=1)
        ]
        out["mtp"] = per_depth
        total = total + cfg.mtp_lambda * sum(per_depth) / len(per_depth)  # eq. (25)
    if cfg.balance == "aux-loss":
        bal = sum(
            sequence_balance_loss(moe.last_routing, x.shape[0], cfg.alpha)
            for moe in model.moe_layers()
        )
        out["balance"] = bal
        total = total + bal
    out["total"] = total
    return out


@torch.no_grad()
def evaluate(model: DeepSeekV3, data: TokenData, cfg: TrainConfig, device: torch.device) -> float:
    """Mean next-token loss on the same eval_batches validation batches every time."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = (t.to(device) for t in data.batch("val", cfg.batch_size, cfg.seq_len, gen))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    return total / cfg.eval_batches


def _row(step, lr, losses, loads, tokens_per_s, entropy) -> dict:
    maxvio = [max_violation(load) for load in loads]
    share = [(load.float() / load.sum()).tolist() for load in loads]
    row = {
        "step": step,
        "loss": losses["main"].item(),
        "lr": lr,
        "tokens_per_s": tokens_per_s,
        "maxvio": sum(maxvio) / len(maxvio) if maxvio else 0.0,
        "maxvio_per_layer": maxvio,
        "expert_load": share,
        "unigram_entropy": entropy,
    }
    if "mtp" in losses:
        row["mtp_loss"] = losses["mtp"][0].item()
    if "balance" in losses:
        row["balance_loss"] = losses["balance"].item()
    return row


def _optimizer(model: DeepSeekV3, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (β 0.9/0.95); weight decay on matrices only, never on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _save_model(path: Path, model: DeepSeekV3, tok) -> None:
    """config.json + safetensors + tokenizer.json, so the folder stands alone."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    tok.save(str(tmp / "tokenizer.json"))
    _swap_in(tmp, path)


def _save_checkpoint(path: Path, model, tok, opt, gen, step: int, cfg: TrainConfig) -> None:
    """Model, tokenizer and trainer state written to a temp folder, then swapped in."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    tok.save(str(tmp / "tokenizer.json"))
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "data_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "train_config": dataclasses.asdict(cfg),
    }
    torch.save(state, tmp / "trainer_state.pt")
    _swap_in(tmp, path)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp`` so that a crash at any moment leaves one complete copy:
    the old one moves to ``path.old`` first and is removed only after the rename."""
    old = path.with_name(f"{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _existing_checkpoint(out: Path) -> Path | None:
    """out/last, or out/last.old when a crash hit between the two renames of ``_swap_in``."""
    for name in ("last", "last.old"):
        if (out / name / "trainer_state.pt").exists():
            return out / name
    return None


def _check_same_run(saved: dict, cfg: TrainConfig) -> None:
    now = dataclasses.asdict(cfg)
    diff = {k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != now.get(k)}
    if diff:
        details = ", ".join(
            f"{k}: checkpoint {saved[k]!r} vs now {now.get(k)!r}" for k in sorted(diff)
        )
        raise ValueError(
            f"--resume with a different configuration ({details}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
