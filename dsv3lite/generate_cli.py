"""``python -m dsv3lite generate CKPT "prompt"``: continue a prompt with a trained checkpoint.

CKPT is a folder holding config.json, the weights and tokenizer.json, as ``python -m dsv3lite
train`` writes to ``runs/<name>/final``. Decoding runs for exactly ``--max-new-tokens`` tokens
(no stop token), so that ``--mtp-speculative`` can be timed against plain decoding of the same
length: it prints the MTP module's acceptance rate, the tokens per main-model forward and both
speeds (report §5.4.3).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .checkpoint import CONFIG_NAME, load_pretrained
from .errors import UserInputError
from .generate import check_sampling, sample
from .model import DeepSeekV3
from .speculative import speculative_generate
from .train.data import load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, the prompt, and the decoding flags."""
    parser.add_argument("checkpoint", help="folder with config.json, weights, tokenizer.json")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (default 64)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = no cut (default 1)"
    )
    parser.add_argument(
        "--mtp-speculative",
        action="store_true",
        help="draft with the MTP module, verify with the main model; report the speed-up",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Load, encode, decode, print; every bad input ends in one line ``error: ...`` (exit
    status 2, printed by ``python -m dsv3lite``)."""
    try:
        _check_flags(args)
        model, tok, ids = _load(args)
    except ValueError as err:  # the checkpoint's own checks, on what the user pointed us at
        raise UserInputError(str(err)) from err
    kwargs = dict(temperature=args.temperature, top_p=args.top_p)
    if not args.mtp_speculative:
        out = sample(model, ids, args.max_new_tokens, generator=_generator(args), **kwargs)
        print(tok.decode(out[0].tolist()))
        return 0
    _warm_up(model, ids, kwargs)
    n = args.max_new_tokens
    out, stats = speculative_generate(model, ids, n, generator=_generator(args), **kwargs)
    started = time.perf_counter()
    plain = sample(model, ids, n, generator=_generator(args), **kwargs)
    _sync(ids.device)
    plain_tps = n / (time.perf_counter() - started)
    print(tok.decode(out[0].tolist()))
    print()
    print(
        f"MTP speculative decoding: {stats.accepted}/{stats.drafts} drafts accepted "
        f"({stats.acceptance_rate:.1%}), {stats.tokens_per_forward:.2f} tokens per main-model "
        f"forward ({stats.main_forwards} forwards for {n} tokens)"
    )
    print(
        f"speed: {stats.tokens_per_second:.1f} tokens/s speculative vs {plain_tps:.1f} tokens/s "
        f"plain decoding ({stats.tokens_per_second / plain_tps:.2f}x), same prompt, {n} new tokens"
    )
    if args.temperature == 0:
        same = "yes" if torch.equal(out, plain) else "NO"
        print(f"greedy: the same tokens as plain greedy decoding: {same}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """What can be refused before loading anything."""
    if not args.prompt.strip():
        raise UserInputError("the prompt is empty: give some text to continue")
    try:  # bytes that are not UTF-8 reach argv as lone surrogates, which no tokenizer encodes
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UserInputError(
            f"the prompt is not UTF-8 text (an invalid byte at character {err.start}); "
            "convert it first, e.g. with iconv"
        ) from None
    check_sampling(args.temperature, args.top_p)
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda, but torch sees no CUDA GPU; use --device cpu")


def _load(args: argparse.Namespace) -> tuple[DeepSeekV3, Tokenizer, torch.Tensor]:
    """The model (fp32), its tokenizer and the encoded prompt [1, T], checked against the model."""
    ckpt = Path(args.checkpoint)
    if not (ckpt / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no checkpoint at {ckpt}: expected a folder with {CONFIG_NAME} "
            "(python -m dsv3lite train writes one to runs/<name>/final)"
        )
    model = load_pretrained(ckpt, device=args.device, dtype=torch.float32)
    tok = load_tokenizer(ckpt, model.config.vocab_size)
    ids = torch.tensor([tok.encode(args.prompt).ids], dtype=torch.long, device=args.device)
    if args.mtp_speculative and model.config.num_nextn_predict_layers < 1:
        raise ValueError(
            f"--mtp-speculative drafts with the MTP module, but {ckpt} has none "
            "(num_nextn_predict_layers=0)"
        )
    limit = model.config.max_position_embeddings
    if ids.shape[1] + args.max_new_tokens > limit:
        raise ValueError(
            f"the prompt is {ids.shape[1]} tokens; with --max-new-tokens "
            f"{args.max_new_tokens} that exceeds max_position_embeddings={limit}"
        )
    return model, tok, ids


def _generator(args: argparse.Namespace) -> torch.Generator:
    """A fresh generator per run, so speculative and plain decoding start from the same seed."""
    return torch.Generator(args.device).manual_seed(args.seed)


def _warm_up(model: DeepSeekV3, ids: torch.Tensor, kwargs: dict) -> None:
    """A few tokens of each path first, so that neither timing pays one-time start-up costs."""
    speculative_generate(model, ids, 4, **kwargs)
    sample(model, ids, 4, **kwargs)
    _sync(ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
