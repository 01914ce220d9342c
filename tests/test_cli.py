"""The command line: ``python -m dsv3lite demo`` reports true figures; bad arguments fail early."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3lite.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dsv3lite", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"demo output lacks {pattern!r}"
    return float(match.group(1).replace(",", ""))


def test_demo_prints_the_key_figures() -> None:
    out = _run("demo", "--steps", "0")
    total = _number(r"total \(MTP excluded\): ([\d,]+)", out)
    assert abs(total - 671e9) <= 0.01 * 671e9
    activated = _number(r"activated per token: ([\d,]+)", out)
    assert abs(activated - 36.7e9) <= 0.01 * 36.7e9
    assert abs(activated - 37e9) <= 0.02 * 37e9
    mha = _number(r"^MHA-equivalent .*?([\d,]+)\s+[\d.]+$", out)
    gqa = _number(r"^GQA-8 .*?([\d,]+)\s+[\d.]+$", out)
    mla = _number(r"^MLA .*?([\d,]+)\s+[\d.]+$", out)
    assert (mha, gqa, mla) == (128 * 320 * 2, 8 * 320 * 2, 576 * 2)
    mla_gib = _number(r"^MLA .*?[\d,]+\s+([\d.]+)$", out)
    assert mla_gib == pytest.approx(1152 * 61 * 131072 / 2**30, abs=0.05)
    assert _number(r"max abs diff ([\d.e+-]+)", out) < 1e-4
    new = re.findall(r"-> new \[([\d, ]+)\]", out)
    assert len(new) == 2 and all(len(row.split(",")) == 8 for row in new)
    assert "the naive path decodes the same tokens: yes" in out


def test_bad_arguments_exit_with_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["bench", "no-such-suite"])
    assert err.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as err:
            main(["bench", "model", "--device", "cuda"])
        assert err.value.code == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_demo_trains_saves_and_samples(tmp_path: Path) -> None:
    out = _run("demo", "--steps", "3", "--out", str(tmp_path / "run"))
    val = _number(r"validation loss ([\d.]+) nats/token", out)
    entropy = _number(r"unigram entropy ([\d.]+)", out)
    assert 0 < val and 0 < entropy < 8
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()
    assert (tmp_path / "run" / "plots" / "loss.png").exists()
    assert "greedy sample:" in out
