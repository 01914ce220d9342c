"""``python -m dsv3lite train``: flags for every TrainConfig field, a summary at the end.

On several processes: ``torchrun --nproc-per-node N -m dsv3lite train --ep N`` (or ``--pp N``);
rank 0 alone prints the summary. A rank that freezes or dies stops the others after
``--timeout-s``: each survivor prints one line saying so, not the backend's traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

from ..errors import UserInputError
from ..model.experts import MOE_IMPLS
from ..parallel.launch import collective_failed
from .balance import BALANCE_MODES
from .config import COMPILE_MODES, TrainConfig
from .trainer import train

_HELP = {
    "preset": "model preset: tiny, small (v3-671b is for accounting only)",
    "steps": "optimizer steps in total (a resumed run continues up to this count)",
    "out": "run folder: metrics.jsonl, last/ (resumable), final/, plots/",
    "data": "a text file or a folder of them (default: CPython's embedded docs)",
    "device": "cpu, cuda or cuda:N (under torchrun: cpu with gloo, or cuda: NCCL, one GPU per "
    "process)",
    "grad_clip": "clip the global gradient norm to this (> 0)",
    "batch_size": "sequences per step on each data-parallel rank (--ep N: N times as many)",
    "ep": "expert-parallel ranks: start with torchrun --nproc-per-node EP",
    "ep_overlap": "with --ep: overlap dispatch/combine with the experts' compute (two "
    "micro-batches)",
    "moe_impl": "routed experts: auto (grouped_mm on a GPU, local on the CPU), local, "
    "grouped_mm (torch._grouped_mm) or triton (the project's grouped GEMM)",
    "compile": "torch.compile each decoder layer: auto (on CUDA, without --ep/--pp/--fp8), on, off",
    "pp": "pipeline stages, one per rank (1F1B): start with torchrun --nproc-per-node PP",
    "micro_batches": "with --pp: micro-batches per step, dividing --batch-size (0: up to 2*pp)",
    "balance": "aux-free (bias update, §2.1.2), aux-loss (eqs. 17-20) or none",
    "gamma": "bias update speed γ of aux-free balancing",
    "alpha": "weight α of the sequence-wise balance loss",
    "mtp_lambda": "weight λ of the MTP loss (eq. 25)",
    "fp8": "train the attention projections and expert Linears in FP8 (§3.3.1)",
    "timeout_s": "seconds a rank waits in a collective for a frozen or dead rank (torchrun); "
    "raise it if writing a checkpoint takes longer",
}
_SKIP = {"progress", "model_overrides"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with its default and type."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"default": f.default, "help": _HELP.get(f.name, f"default: {f.default}")}
        if str(f.type) == "bool":
            parser.add_argument(flag, action="store_true", help=kwargs["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        if f.name == "balance":
            kwargs["choices"] = BALANCE_MODES
        if f.name == "moe_impl":
            kwargs["choices"] = MOE_IMPLS
        if f.name == "compile":
            kwargs["choices"] = COMPILE_MODES
        parser.add_argument(flag, type=kind, **kwargs)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - _SKIP
    cfg = TrainConfig(**{n: getattr(args, n) for n in names}, progress=not args.no_progress)
    try:
        result = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise UserInputError(_as_flags(str(err))) from err
    except RuntimeError as err:
        if not collective_failed(err):
            raise
        _collective_failed(err, cfg.timeout_s)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(
        f"validation loss {result.val_loss:.3f} nats/token after {result.step} steps "
        f"(unigram entropy of the corpus: {result.unigram_entropy:.3f})"
    )
    print(f"metrics: {result.metrics}")
    print(f"plots:   {', '.join(str(p) for p in result.plots)}")
    print(f"model:   {result.final}")
    return 0


def _as_flags(message: str) -> str:
    """TrainConfig.grad_clip → --grad-clip: on the command line, name the flag to change."""
    return re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), message)


def _collective_failed(err: RuntimeError, timeout_s: float) -> None:
    """One line on this (surviving) rank, then exit: the backend's traceback says where the
    wait ended, not that another rank stopped answering."""
    timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
    what = f"waited {timeout_s:g} s (--timeout-s) for" if timed_out else "lost the connection to"
    print(
        f"error: rank {os.environ.get('RANK', '?')}: a collective {what} another rank, which "
        "froze or died; see that rank's output",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)  # no interpreter shutdown: tearing down a broken process group can hang
