"""Training a DeepSeek-V3-style model: next-token + MTP losses, balancing, logging, checkpoints.

    L = L_main + λ · (1/D) Σ_k L^k_MTP (eqs. 24–25) [+ Σ_layers L_Bal (eq. 17) with aux-loss]

The model computes L itself (``model(x, labels=y, **cfg.loss_args())``, see ``ModelOutput``).
One optimizer step per batch; after it, the aux-loss-free bias update from the loads of that
step's ``ModelOutput.routing``.
Everything a restart needs (weights, optimizer, step, random states) is written atomically to
``out/last`` every ``ckpt_every`` steps, so a killed run resumes where its last checkpoint left
(``resume.py`` says what survives a kill, and why a run folder's files never run code).

The same loop trains on several processes under torchrun (``--ep N``: expert parallelism,
``--pp N``: a 1F1B pipeline): what differs lives in ``distributed.py``, behind a ``Parallel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_pretrained, write_model_files
from ..config import atomic_write_text, preset
from ..errors import UserInputError
from ..model import DeepSeekV3
from ..model.experts import set_moe_impl
from .balance import max_violation, update_bias
from .config import TrainConfig
from .data import TokenData, load_tokenizer, read_corpus, train_tokenizer
from .distributed import Parallel, setup_parallel
from .optim import build_optimizer
from .plots import plot_run
from .resume import MARKER, load_state, newest_complete, save_atomically, save_state
from .schedule import lr_at

# Fields that may change between a run and its --resume; any other difference is refused.
RESUMABLE_CHANGES = {
    "steps", "log_every", "eval_every", "ckpt_every", "device", "out", "progress", "timeout_s",
    "compile", "moe_impl",
}  # fmt: skip
EVAL_SEED = 1234  # the validation batches' generator (plus the data-parallel rank)


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
    """Train (or resume) a run; ``on_log`` receives every logged metrics row (live plots).

    With ``ep`` or ``pp`` > 1 every rank started by torchrun calls it; rank 0 alone logs,
    plots and writes checkpoints, and every rank returns the result (the plots on rank 0)."""
    cfg.validate()
    par = setup_parallel(cfg)
    out = Path(cfg.out)
    last = newest_complete(out / "last")
    if resume and last is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint under {out} to resume from (a last/ holding {MARKER})"
        )
    if not resume and (last is not None or (out / "last").exists()):  # never overwrite a run
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")

    device = par.device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    text = read_corpus(cfg.data)
    if resume:
        state = load_state(last)
        _check_same_run(state["train_config"], cfg)
        model = load_pretrained(last, device=device, dtype=torch.float32)
        tok = load_tokenizer(last, model.config.vocab_size)
    else:
        model_config = preset(cfg.preset, **cfg.model_overrides)
        model = DeepSeekV3(model_config).to(device)
        tok = train_tokenizer(text, model_config.vocab_size)
        state = None
    par.check_same(tok.to_str(), "tokenizer")
    set_moe_impl(model, cfg.moe_impl)
    trained = par.prepare(model)
    if cfg.fp8:  # parameters are shared, so checkpoints and the optimizer are unchanged
        from ..fp8 import to_fp8

        to_fp8(model)
    if cfg.compiles():
        model.compile_layers()
    data = TokenData.from_text(text, tok)
    entropy = data.unigram_entropy()
    opt = build_optimizer(trained, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + par.dp_rank)
    step = 0
    if state is not None:
        mine = state if par.rank == 0 else state["other_ranks"][par.rank - 1]
        opt.load_state_dict(mine["optimizer"])
        gen.set_state(mine["data_rng"])
        torch.set_rng_state(mine["torch_rng"])
        step = state["step"]
    metrics_path = out / "metrics.jsonl"
    if par.is_main:
        _truncate_metrics(metrics_path, step)
        out.mkdir(parents=True, exist_ok=True)

    moe_layers = model.moe_layers()
    show = cfg.progress and par.is_main
    bar = tqdm(total=cfg.steps, initial=step, disable=not show, desc="train", unit="step")
    window_tokens, window_start = 0, time.perf_counter()
    val_loss = math.nan
    while step < cfg.steps:
        lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
        x, y = (t.to(device) for t in data.batch("train", cfg.batch_size, cfg.seq_len, gen))
        logged, loads = _train_step(par, model, opt, x, y, cfg, lr, moe_layers)
        step += 1
        window_tokens += x.numel() * par.dp_size
        bar.update(1)

        evaluated = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluated:
            seed = EVAL_SEED + par.dp_rank
            val_loss = par.mean(evaluate(par.synced(model), data, cfg, device, seed))
        if step % cfg.log_every == 0 or evaluated:  # every validation loss gets its row
            elapsed = time.perf_counter() - window_start
            values = par.reduce_logged(logged)
            row = _row(step, lr, values, loads, window_tokens / elapsed, entropy)
            if evaluated:
                row["val_loss"] = val_loss
            if par.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", maxvio=f"{row['maxvio']:.2f}")
                if on_log is not None:
                    on_log(row)
            window_tokens, window_start = 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_checkpoint(out / "last", par, model, tok, opt, gen, step, cfg)
    bar.close()
    final = out / "final"
    _save_model(final, par, model, tok, step)
    plots = plot_run(metrics_path, out / "plots") if par.is_main else []
    par.close()
    return RunResult(out, step, val_loss, entropy, metrics_path, plots, final)


def _train_step(
    par: Parallel,
    model: DeepSeekV3,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    lr: float,
    moe_layers: list[torch.nn.Module],
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One optimizer step laid out by ``par`` (clipped on the global gradient norm), then the
    aux-loss-free bias update from the step's loads (of ``moe_layers``, in order); returns the
    loss fields to log and the loads."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logged = par.forward_backward(model, x, y, cfg.loss_args())
    par.clip_grad_norm_(cfg.grad_clip)
    opt.step()
    loads = par.loads()
    if cfg.balance == "aux-free":
        update_bias(moe_layers, loads, cfg.gamma)
    return logged, loads


@torch.no_grad()
def evaluate(
    model: DeepSeekV3,
    data: TokenData,
    cfg: TrainConfig,
    device: torch.device,
    seed: int = EVAL_SEED,
) -> float:
    """Mean next-token loss on the same eval_batches validation batches every time (those of
    generator ``seed``: each data-parallel rank evaluates its own)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = (t.to(device) for t in data.batch("val", cfg.batch_size, cfg.seq_len, gen))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += model(x, labels=y).main_loss.item()
    return total / cfg.eval_batches


def _row(step, lr, values: dict[str, float], loads, tokens_per_s, entropy) -> dict:
    maxvio = [max_violation(load) for load in loads]
    share = [(load.float() / load.sum()).tolist() for load in loads]
    row = {
        "step": step,
        "loss": values["loss"],
        "lr": lr,
        "tokens_per_s": tokens_per_s,
        "maxvio": sum(maxvio) / len(maxvio) if maxvio else 0.0,
        "maxvio_per_layer": maxvio,
        "expert_load": share,
        "unigram_entropy": entropy,
    }
    row.update((k, v) for k, v in values.items() if k != "loss")  # mtp_loss, balance_loss
    return row


def _save_model(
    path: Path, par: Parallel, model: DeepSeekV3, tok, step: int, state: dict | None = None
) -> None:
    """config.json + safetensors + tokenizer.json (+ trainer_state.pt), so the folder stands
    alone; saved atomically, as resume.py describes. Every rank calls it, rank 0 writes the
    complete model."""
    full = par.full_model(model)
    if full is None:
        return

    def write(folder: Path) -> None:
        write_model_files(full, folder)
        tok.save(str(folder / "tokenizer.json"))
        if state is not None:
            save_state(folder, state)

    save_atomically(path, step, write)


def _save_checkpoint(
    path: Path, par: Parallel, model, tok, opt, gen, step: int, cfg: TrainConfig
) -> None:
    """The model plus everything a restart needs. The trainer state holds rank 0's optimizer
    and random states at the top, as one process writes them, and with several ranks every
    other rank's under ``other_ranks`` (a resume needs the same ep/pp: _check_same_run)."""
    mine = {
        "optimizer": opt.state_dict(),
        "data_rng": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    ranks = par.gather(mine)
    state = None
    if ranks is not None:
        state = {"step": step, **ranks[0], "train_config": dataclasses.asdict(cfg)}
        if len(ranks) > 1:
            state["other_ranks"] = ranks[1:]
    _save_model(path, par, model, tok, step, state)


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
    """Drop rows logged after the checkpoint we resume from (they will be logged again), and a
    last line that a kill cut short in mid-write (with a warning)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    keep = []
    for i, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines):
                raise UserInputError(f"{path}, line {i}: not a JSON row; repair it") from None
            warnings.warn(f"{path}: dropped its last line, cut short: {line[:60]!r}", stacklevel=2)
            break
        if row["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
