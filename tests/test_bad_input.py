"""Bad input on the command line: one line ``error: ...`` naming the flag or file and what is
allowed, exit status 2, no traceback; a genuine bug keeps its traceback; a frozen rank stops a
torchrun job after ``--timeout-s`` with one line from the survivor."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv3lite import DeepSeekV3, preset, save_pretrained
from dsv3lite.__main__ import main
from dsv3lite.generate import probabilities
from dsv3lite.train.data import default_corpus, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys, argv: list[str]) -> str:
    """Run ``python -m dsv3lite ARGV`` in this process; it must exit 2 with one stderr line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _subprocess(*argv: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3lite", *argv], cwd=ROOT, capture_output=True, timeout=120
    )


# ------------------------------------------------------------------ training flags
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--eval-batches", "0"], "--eval-batches"),
        (["--grad-clip", "0"], "--grad-clip"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--gamma", "-0.001"], "--gamma"),
        (["--alpha", "nan"], "--alpha"),
        (["--mtp-lambda", "nan"], "--mtp-lambda"),
        (["--mtp-lambda", "-0.3"], "--mtp-lambda"),
        (["--warmup", "-1"], "--warmup"),
        (["--lr", "inf"], "--lr"),
        (["--min-lr", "1.0"], "--min-lr"),
        (["--timeout-s", "0"], "--timeout-s"),
        (["--out", ""], "--out"),
        (["--data", ""], "--data"),
        (["--device", "cdua"], "--device"),
        (["--device", "cuda:9"], "--device"),
        (["--preset", "huge"], "preset"),
        (["--preset", "v3-671b"], "--preset 'v3-671b'"),
    ],
)
def test_bad_training_flags(capsys, tmp_path, flags, named):
    base = ["train", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    line = _error_line(capsys, [*base, "--out", str(tmp_path / "run"), *flags])
    assert named in line
    assert not (tmp_path / "run").exists()  # refused before any work


def test_the_671b_preset_is_refused_with_its_size(capsys, tmp_path):
    line = _error_line(capsys, ["train", "--preset", "v3-671b", "--out", str(tmp_path)])
    assert "parameters" in line and "GiB" in line and "B parameters" in line


def test_a_training_flag_error_from_a_fresh_process():
    proc = _subprocess("train", "--eval-batches", "0", "--out", "unused")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "error: --eval-batches must be an int >= 1, got 0",
    ]


def test_a_genuine_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only bad input is shortened: an exception from our own code still propagates."""

    def broken(args, parser):
        raise KeyError("a bug")

    monkeypatch.setattr("dsv3lite.train.cli.run", broken)
    with pytest.raises(KeyError):
        main(["train", "--out", str(tmp_path)])


# ------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_pretrained(DeepSeekV3(preset("tiny")), path)
    train_tokenizer(default_corpus()[:50_000], 300).save(str(path / "tokenizer.json"))
    return path


def _broken_copy(checkpoint: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / name).write_bytes(content)
    return copy


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": ', "tokenizer.json"),
        ("tokenizer.json", b"\xff\xfe\x00garbage", "tokenizer.json"),
        ("config.json", b"[]", "JSON object"),
        ("config.json", b"null", "JSON object"),
        ("config.json", b'{"vocab_size": ', "not valid JSON"),
        ("config.json", b'{"model_type": "deepseek_v3\xff"}', "not UTF-8"),
        ("config.json", b'{"n_group": null}', "n_group"),
    ],
)
def test_corrupt_checkpoint_files_are_named(capsys, checkpoint, tmp_path, name, content, words):
    copy = _broken_copy(checkpoint, tmp_path, name, content)
    line = _error_line(capsys, ["generate", str(copy), "hi"])
    assert words in line and name in line


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "nan"], "top_p"),
        (["--temperature", "nan"], "temperature"),
        (["--temperature", "inf"], "temperature"),
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
    ],
)
def test_bad_sampling_flags(capsys, checkpoint, flags, named):
    assert named in _error_line(capsys, ["generate", str(checkpoint), "hi", *flags])


def test_a_denormal_temperature_decodes_greedily(capsys, checkpoint):
    """1e-45 used to turn logits into inf and softmax into NaN; it is the greedy limit."""
    logits = torch.randn(3, 300) * 30
    probs = probabilities(logits, 1e-45)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 300).float())
    outputs = []
    for temperature in ("0", "1e-45"):
        argv = ["generate", str(checkpoint), "hi", "--max-new-tokens", "4"]
        assert main([*argv, "--temperature", temperature]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


@pytest.mark.skipif(sys.platform == "win32", reason="argv bytes are POSIX")
def test_a_prompt_that_is_not_utf8(checkpoint):
    proc = _subprocess("generate", str(checkpoint), b"caf\xe9 au lait")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "prompt is not UTF-8" in lines[0]


# ------------------------------------------------------------------ a frozen rank
def _ranks(parent: int) -> dict[int, int]:
    """torchrun's workers, by RANK: its child processes, found through /proc."""
    ranks = {}
    for d in Path("/proc").iterdir():
        try:
            if (
                d.name.isdigit()
                and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent
            ):
                env = dict(
                    e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e
                )
                ranks[int(env[b"RANK"])] = int(d.name)
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile, or not a worker
    return ranks


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_a_frozen_rank_stops_the_job_after_the_timeout(tmp_path):
    """Rank 1 is stopped (SIGSTOP: alive, silent) mid-training. Rank 0 gives up after
    --timeout-s and prints one line saying why, not gloo's traceback."""
    out, log = tmp_path / "run", tmp_path / "stderr"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "dsv3lite", "train", "--preset", "tiny", "--ep", "2", "--steps", "100000",
            "--batch-size", "2", "--seq-len", "32", "--log-every", "1", "--no-progress",
            "--timeout-s", "10", "--out", str(out)]  # fmt: skip
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # training has begun
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while _running(ranks[0]):
            assert time.monotonic() - stopped < 60, "rank 0 still waits"
            time.sleep(0.1)
        waited = time.monotonic() - stopped
    finally:
        for pid in ranks.values():  # SIGKILL ends a stopped process too
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    text = log.read_text()
    reason = "error: rank 0: a collective waited 10 s (--timeout-s) for another rank"
    assert reason in text, text
    assert "gloo/transport" not in text  # the raw backend error stays out of sight
    assert waited < 10 + 15
