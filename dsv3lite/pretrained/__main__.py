"""``python -m dsv3lite.pretrained RUN/last``: copy a ``train`` checkpoint into the package as
the shipped model, in bf16 (half the bytes; the notebooks compute in fp32 after loading), with
the run's last evaluation at or before the checkpoint's step as metrics.json."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import load_pretrained, save_pretrained
from . import path


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m dsv3lite.pretrained RUN/last")
    src, dst = Path(argv[0]), path()
    model = load_pretrained(src, dtype=torch.bfloat16)
    if dst.exists():
        shutil.rmtree(dst)
    save_pretrained(model, dst)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    rows = [json.loads(line) for line in (src.parent / "metrics.jsonl").read_text().splitlines()]
    step = json.loads((src / "complete.json").read_text())["step"]
    last = next(r for r in reversed(rows) if "val_loss" in r and r["step"] <= step)
    last = {k: v for k, v in last.items() if isinstance(v, int | float)}
    (dst / "metrics.json").write_text(json.dumps(last, indent=1) + "\n")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {dst} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(sys.argv[1:])
