"""Training end to end: metrics, checkpoints transformers can read, a real kill and --resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv3lite
from dsv3lite.train import TrainConfig, train
from dsv3lite.train.resume import load_state, newest_complete

FAST = dict(batch_size=4, seq_len=32, log_every=2, eval_every=4, eval_batches=2, progress=False)


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "dsv3lite", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(TrainConfig(steps=8, ckpt_every=4, out=str(out), **FAST))


def test_metrics_rows_hold_the_required_fields(short_run):
    rows = [json.loads(x) for x in short_run.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "maxvio", "mtp_loss"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["maxvio"] >= 0
    assert rows[-1]["val_loss"] == pytest.approx(short_run.val_loss)
    assert all(p.stat().st_size > 0 for p in short_run.plots)


def test_checkpoint_is_self_contained_and_transformers_agrees(short_run):
    transformers = pytest.importorskip("transformers")
    final = short_run.final
    assert (final / "tokenizer.json").exists() and (final / "config.json").exists()
    ours = dsv3lite.load_pretrained(final)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
        final, attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_aux_free_bias_moves_and_aux_loss_is_logged(tmp_path):
    r = train(TrainConfig(steps=4, out=str(tmp_path / "af"), ckpt_every=4, **FAST))
    model = dsv3lite.load_pretrained(r.final)
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())
    r = train(
        TrainConfig(steps=2, out=str(tmp_path / "al"), balance="aux-loss", ckpt_every=2, **FAST)
    )
    row = json.loads(r.metrics.read_text().splitlines()[-1])
    assert row["balance_loss"] > 0


def test_bad_runs_are_refused(tmp_path, short_run):
    with pytest.raises(ValueError, match="balance"):
        train(TrainConfig(balance="sometimes", out=str(tmp_path / "x")))
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(steps=8, out=str(short_run.out), **FAST))
    with pytest.raises(ValueError, match="seq_len"):
        train(TrainConfig(steps=9, out=str(short_run.out), **{**FAST, "seq_len": 16}), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(out=str(tmp_path / "empty")), resume=True)


def _saved_step(out: Path) -> int:
    """The step --resume would start from (0 while there is no checkpoint)."""
    try:
        last = newest_complete(out / "last")
        return 0 if last is None else load_state(last)["step"]
    except FileNotFoundError:  # renamed by the running save between the two calls
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL mid-run: the last checkpoint survives, and --resume ends exactly where an
    uninterrupted run ends (same data order, optimizer state, biases)."""
    flags = ["--steps", 12, "--batch-size", 4, "--seq-len", 32, "--log-every", 1,
             "--eval-every", 6, "--ckpt-every", 3, "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = _cli("--out", killed, *flags, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and _saved_step(killed) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = _saved_step(killed)
    assert 6 <= step < 12, "the run was not interrupted mid-way"
    assert dsv3lite.load_pretrained(newest_complete(killed / "last"))  # it is complete
    resumed = _cli("--out", killed, *flags, "--resume", env=env)
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()
    clean = tmp_path / "clean"
    assert _cli("--out", clean, *flags, env=env).wait(timeout=120) == 0
    a = dsv3lite.load_pretrained(killed / "final").state_dict()
    b = dsv3lite.load_pretrained(clean / "final").state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    rows = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 13)), "metrics rows after the checkpoint must not repeat"
    assert Path(killed / "final" / "tokenizer.json").exists()


def test_fp8_recipe_trains_and_saves_plain_weights(tmp_path):
    from dsv3lite.fp8 import FP8Linear

    seen = []
    cfg = TrainConfig(steps=4, out=str(tmp_path / "fp8"), fp8=True, ckpt_every=4, **FAST)
    r = train(cfg, on_log=lambda row: seen.append(row["loss"]))
    assert len(seen) == 2 and all(math.isfinite(x) for x in seen)
    model = dsv3lite.load_pretrained(r.final)  # master weights: a plain checkpoint
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
