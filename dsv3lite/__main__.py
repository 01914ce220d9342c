"""Command line: ``python -m dsv3lite {demo,train,generate,bench,convert,doctor} ...``
(also installed as ``dsv3lite``).

Thin on purpose: it parses arguments and hands over to the module that does the work, imported
only when its subcommand runs.

Bad input (a ``UserInputError``, a missing file, a file that is not JSON or not text) ends in
one line, ``error: ...``, and exit status 2, as argparse's own errors do; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import UserInputError

# what a user can cause by typing a wrong flag or pointing at a wrong file
USER_ERRORS = (
    UserInputError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .demo import run

    run(steps=args.steps, out=args.out)
    return 0


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import resolve_device, run
    from .config import PRESETS

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    options = {}
    if args.preset is not None:
        if args.suite != "train":
            parser.error("--preset applies to bench train only")
        if args.preset not in PRESETS or args.preset == "v3-671b":
            parser.error(f"--preset must be one of tiny, small, medium, got {args.preset!r}")
        options["preset_name"] = args.preset
    run(args.suite, device=device, out=args.out, quick=args.quick, **options)
    return 0


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.cli import run

    return run(args, parser)


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .generate_cli import run

    return run(args, parser)


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .convert import to_hf, to_official

    if args.to == "official":
        if args.config is not None:
            parser.error("--config applies to --to hf only (--to official reads config.json)")
        to_official(args.src, args.dst, mp=args.mp)
    elif args.mp != 1:
        parser.error("--mp applies to --to official only (--to hf reads every rank's file)")
    else:
        to_hf(args.src, args.dst, config=args.config)
    return 0


def _docs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .docs import run

    return run(args)


def _doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .doctor import main

    return main()


def _parser() -> argparse.ArgumentParser:
    from .bench import SUITES

    parser = argparse.ArgumentParser(
        prog="python -m dsv3lite",
        description="dsv3lite: a working, readable reproduction of DeepSeek-V3's infrastructure.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    demo = commands.add_parser(
        "demo", help="a tour in plain text: accounting, MLA caches, a tiny model"
    )
    demo.add_argument(
        "--steps", type=int, default=400, help="training steps of section 5 (0: tour only)"
    )
    demo.add_argument("--out", default=None, help="run folder (default: runs/demo-<time>)")
    demo.set_defaults(func=_demo)

    from .train.cli import add_arguments

    train = commands.add_parser(
        "train", help="train a model on the embedded corpus (or --data), with checkpoints"
    )
    add_arguments(train)
    train.set_defaults(func=_train)

    from .generate_cli import add_arguments as add_generate_arguments

    generate = commands.add_parser(
        "generate", help="continue a prompt with a checkpoint (optionally MTP-speculative)"
    )
    add_generate_arguments(generate)
    generate.set_defaults(func=_generate)

    bench = commands.add_parser(
        "bench", help="time ours and the baselines, print one table, write JSON"
    )
    bench.add_argument("suite", choices=sorted(SUITES), help="what to time")
    bench.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if present"
    )
    bench.add_argument(
        "--out", default=None, help="JSON path (default: bench_results/<suite>-<device>.json)"
    )
    bench.add_argument(
        "--quick", action="store_true", help="small shapes and few repetitions (smoke test)"
    )
    bench.add_argument(
        "--preset", default=None, help="bench train: the model preset (default: small on a GPU)"
    )
    bench.set_defaults(func=_bench)

    convert = commands.add_parser(
        "convert", help="the release's format <-> DeepSeek's inference format (model{i}-mp{n})"
    )
    convert.add_argument("src", help="checkpoint folder to read")
    convert.add_argument("dst", help="new folder to write (must not exist or be empty)")
    convert.add_argument("--to", choices=("official", "hf"), required=True, help="target format")
    convert.add_argument(
        "--mp", type=int, default=1, help="--to official: model-parallel ranks (default 1)"
    )
    convert.add_argument(
        "--config",
        default=None,
        help="--to hf: DeepSeek's ModelArgs JSON, if SRC has no model_args.json",
    )
    convert.set_defaults(func=_convert)

    doctor = commands.add_parser(
        "doctor", help="check that this machine is ready for the course, with a fix per problem"
    )
    doctor.set_defaults(func=_doctor)

    docs = commands.add_parser("docs", help="the notebooks as a static site that needs no network")
    docs.add_argument("--out", default="site", help="folder to write (default: site)")
    docs.add_argument(
        "--notebooks", default="notebooks", help="folder of NN_*.ipynb (default: notebooks)"
    )
    docs.set_defaults(func=_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dsv3lite`` and of the ``dsv3lite`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, parser)
    except USER_ERRORS as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
