"""What a training run does: ``TrainConfig``, every field a flag of ``python -m dsv3lite train``,
checked before any work starts. Its own module so that the trainer and the parallel layouts
(``distributed.py``) both read it without importing each other."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..accounting import count_parameters, format_count
from ..config import preset
from ..errors import UserInputError, check_bool, check_int, check_number
from ..model.experts import MOE_IMPLS
from .balance import BALANCE_MODES

# torch.compile of each decoder layer: 'auto' compiles on CUDA for a single-process bf16 run (the
# eager GPU step is bound by launching ~4,000 small kernels; fused layers launch half as many)
COMPILE_MODES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """What a training run does; every field is a CLI flag of ``python -m dsv3lite train``."""

    preset: str = "tiny"
    steps: int = 600
    batch_size: int = 16  # per data-parallel rank: with --ep N, N·batch_size sequences a step
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
    ep: int = 1  # expert-parallel ranks (torchrun --nproc-per-node ep)
    ep_overlap: bool = False  # --ep: the two-micro-batch overlap of dispatch/combine
    moe_impl: str = "auto"  # how the routed experts compute: model/experts.py's MOE_IMPLS
    compile: str = "auto"  # torch.compile each decoder layer: COMPILE_MODES (auto: on CUDA)
    pp: int = 1  # pipeline stages, one per rank (torchrun --nproc-per-node pp)
    micro_batches: int = 0  # --pp: the batch's split for the pipeline (0: up to 2·pp)
    timeout_s: float = 60.0  # how long a collective waits for a frozen or dead rank (torchrun)
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def compiles(self) -> bool:
        """Whether the run compiles its layers: 'on', or 'auto' for a single-process CUDA run
        without FP8 (the expert-parallel and pipeline collectives and the FP8 kernels stay
        eager)."""
        if self.compile != "auto":
            return self.compile == "on"
        return self.device.startswith("cuda") and self.ep == 1 and self.pp == 1 and not self.fp8

    def loss_args(self) -> dict[str, Any]:
        """The loss keywords of ``DeepSeekV3.forward`` for this run: the MTP modules run in every
        step (their loss is logged even with λ = 0), the balance loss only with 'aux-loss'."""
        alpha = self.alpha if self.balance == "aux-loss" else None
        return {"mtp": True, "mtp_lambda": self.mtp_lambda, "alpha": alpha}

    def validate(self) -> None:
        """Clear errors naming the field and what is allowed, before any work starts (the
        command line names the flag: TrainConfig.grad_clip is --grad-clip)."""
        positive = ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches")
        for name in (*positive, "ckpt_every", "ep", "pp"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 1)
        for name in ("warmup", "micro_batches", "seed"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 0)
        # NaN or infinity in any of these trains NaN (or never stops waiting) without an error;
        # grad_clip 0 would zero every gradient, a negative one flip them
        for name in ("lr", "min_lr", "grad_clip", "timeout_s"):
            check_number(f"TrainConfig.{name}", getattr(self, name))
        for name in ("weight_decay", "gamma", "alpha", "mtp_lambda"):  # 0 switches the term off
            check_number(f"TrainConfig.{name}", getattr(self, name), strict=False)
        for name in ("fp8", "progress", "ep_overlap"):
            check_bool(f"TrainConfig.{name}", getattr(self, name))
        if self.compile not in COMPILE_MODES:
            raise UserInputError(
                f"TrainConfig.compile must be one of {COMPILE_MODES}, got {self.compile!r}"
            )
        if self.moe_impl not in MOE_IMPLS:
            raise UserInputError(
                f"TrainConfig.moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}"
            )
        if self.min_lr > self.lr:
            raise UserInputError(
                f"TrainConfig.min_lr must be <= lr, got min_lr={self.min_lr}, lr={self.lr}"
            )
        if self.balance not in BALANCE_MODES:
            raise UserInputError(
                f"TrainConfig.balance must be one of {BALANCE_MODES}, got {self.balance!r}"
            )
        # '' is the current folder: a run would write its files there, or read every text in it
        if not (isinstance(self.out, str) and self.out.strip()):
            raise UserInputError(f"TrainConfig.out must name the run folder, got {self.out!r}")
        if self.data is not None and not (isinstance(self.data, str) and self.data.strip()):
            raise UserInputError(f"TrainConfig.data must name a file or folder, got {self.data!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserInputError(f"TrainConfig.out must be a folder, but {self.out} is a file")
        self._validate_device()
        self._validate_layout()
        self._validate_memory()

    def _validate_device(self) -> None:
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise UserInputError(
                f"TrainConfig.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if self.device == "cpu":
            return
        count = torch.cuda.device_count()
        if count == 0:
            raise UserInputError(
                f"TrainConfig.device is {self.device!r} but torch sees no CUDA GPU; use 'cpu'"
            )
        index = int(self.device.partition(":")[2] or 0)
        if index >= count:
            raise UserInputError(
                f"TrainConfig.device is {self.device!r} but torch sees {count} GPU(s): "
                f"cuda:0 to cuda:{count - 1}"
            )

    def _validate_memory(self) -> None:
        """Refuse a model whose fp32 weights, gradients and two AdamW moments (16 bytes a
        parameter) exceed the device's memory: v3-671b would start allocating terabytes."""
        params = count_parameters(preset(self.preset, **self.model_overrides))
        n = params.total_sum + params.mtp_total
        need, have = 16 * n, _memory_bytes(self.device)
        if have is not None and need > have:
            raise UserInputError(
                f"TrainConfig.preset {self.preset!r} has {format_count(n)} parameters: training "
                f"needs about {need / 2**30:,.0f} GiB (fp32 weights, gradients, AdamW moments), "
                f"but {self.device} has {have / 2**30:,.0f} GiB; choose 'tiny' or 'small'"
            )

    def _validate_layout(self) -> None:
        if self.ep > 1 and self.pp > 1:
            raise UserInputError(
                f"TrainConfig.ep={self.ep} and pp={self.pp}: expert and pipeline parallelism "
                "together are not supported; use one of them"
            )
        if self.ep_overlap and self.ep == 1:
            raise UserInputError("TrainConfig.ep_overlap overlaps --ep's all-to-alls; needs ep > 1")
        if self.micro_batches and self.pp == 1:
            raise UserInputError(
                "TrainConfig.micro_batches splits the batch for --pp > 1; leave it 0"
            )
        if self.micro_batches and self.batch_size % self.micro_batches:
            raise UserInputError(
                f"TrainConfig.micro_batches ({self.micro_batches}) must divide batch_size "
                f"({self.batch_size}): every micro-batch holds as many sequences"
            )


def _memory_bytes(device: str) -> int | None:
    """The GPU's memory, or the machine's RAM for 'cpu'; None where the OS does not say."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None
