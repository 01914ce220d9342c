"""Training on several processes (gloo on CPU): ``torchrun ... train --ep 2`` end to end and
resumed; one EP or PP step equal to one single-process step on the same tokens; a PP run equal
to a single-process run; a wrong number of processes or layout refused before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import dsv3lite
from dsv3lite.parallel.launch import launch
from dsv3lite.testing import rel_err
from dsv3lite.testing.train import step_check
from dsv3lite.train import TrainConfig, train

FAST = dict(batch_size=2, seq_len=32, eval_batches=1, log_every=1, progress=False)
CHECKS = [("ep", "aux-free"), ("ep", "aux-loss"), ("pp", "aux-free"), ("pp", "aux-loss")]
CHECKS += [("ep", "aux-loss", 4, 16, True)]  # with the two-micro-batch overlap


def _torchrun(*args) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m dsv3lite train ...`` (torchrun is
    ``python -m torch.distributed.run``; this way it is this interpreter's)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "dsv3lite", "train", "--preset", "tiny", *map(str, args)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=150,
    )  # fmt: skip


def _checks_and_pp_run(cfg: TrainConfig) -> dict:
    """One launch for every case: a fresh process's start costs more than a tiny step."""
    return {"checks": [step_check(*case) for case in CHECKS], "pp_run": train(cfg)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pp")
    cfg = TrainConfig(steps=2, pp=2, out=str(out / "pp"), **{**FAST, "batch_size": 4})
    ranks = launch(_checks_and_pp_run, 2, cfg, timeout_s=150)
    one = train(dataclasses.replace(cfg, pp=1, out=str(out / "one")))
    return {"ranks": ranks, "pp": cfg, "one": one}


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", range(len(CHECKS)), ids=["-".join(map(str, c)) for c in CHECKS])
def test_one_step_equals_single_process(two_ranks, case):
    """EP: each rank's own batch against one process on both; PP: 1F1B over micro-batches
    against the whole batch. Gradients after global-norm clipping within 1e-5; weights after
    AdamW within 1e-4 (its first step divides by |g| + eps, which magnifies the fp32 noise of
    near-zero gradient elements); the same expert loads, hence the same bias update."""
    for rank in two_ranks["ranks"]:
        res = rank["checks"][case]
        assert res["losses"].keys() == res["ref_losses"].keys()
        for key, ref in res["ref_losses"].items():
            assert res["losses"][key] == pytest.approx(ref, rel=1e-6), key
        assert res["grad_error"] < 1e-5
        assert res["weight_error"] < 1e-4
        assert res["loads_equal"] and res["bias_error"] == 0.0


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_pipeline_run_equals_single_process_run(two_ranks):
    """The whole loop under --pp 2 (stages synced for evaluation and the checkpoint) logs the
    losses, and saves the weights, of a single-process run on the same batches."""
    pp, one = two_ranks["ranks"][0]["pp_run"], two_ranks["one"]
    rows = [json.loads(line) for line in pp.metrics.read_text().splitlines()]
    ref = [json.loads(line) for line in one.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r, q in zip(rows, ref):
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-5)
        assert r["mtp_loss"] == pytest.approx(q["mtp_loss"], rel=1e-5)
        assert r["expert_load"] == q["expert_load"]
    assert pp.val_loss == pytest.approx(one.val_loss, rel=1e-5)
    a = dsv3lite.load_pretrained(pp.final).state_dict()
    b = dsv3lite.load_pretrained(one.final).state_dict()
    assert a.keys() == b.keys()
    assert max(rel_err(a[k], b[k]) for k in b) < 1e-4


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_torchrun_ep_trains_saves_and_resumes(tmp_path):
    out = tmp_path / "ep"
    flags = ["--ep", 2, "--batch-size", 2, "--seq-len", 32, "--eval-batches", 1,
             "--log-every", 1, "--no-progress", "--out", out]  # fmt: skip
    proc = _torchrun(*flags, "--steps", 2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("validation loss") == 1, "only rank 0 prints"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 for r in rows)
    model = dsv3lite.load_pretrained(out / "final")  # the experts gathered: a full checkpoint
    assert [len(m.experts) for m in model.moe_layers()] == [16] * 4
    state = torch.load(out / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["other_ranks"]) == 1

    # --resume with the same --ep, on the Python API's ranks (cheaper to start than torchrun)
    cfg = TrainConfig(steps=3, ep=2, out=str(out), **FAST)
    result = launch(train, 2, cfg, True, timeout_s=150)[0]
    assert result.step == 3
    rows = [json.loads(line)["step"] for line in result.metrics.read_text().splitlines()]
    assert rows == [1, 2, 3]
    with pytest.raises(ValueError, match="ep: checkpoint 2 vs now 1"):
        train(dataclasses.replace(cfg, ep=1, steps=4), resume=True)


def test_wrong_number_of_processes_is_refused(tmp_path, monkeypatch):
    out = str(tmp_path / "x")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        train(TrainConfig(ep=2, out=out))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"--ep 3 × --pp 1 = 3 ranks, but WORLD_SIZE=2"):
        train(TrainConfig(ep=3, out=out))
    with pytest.raises(ValueError, match="--ep 1 --pp 1 trains on one"):
        train(TrainConfig(out=out))


def test_bad_layouts_are_refused(tmp_path):
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match="expert and pipeline parallelism together"):
        train(TrainConfig(ep=2, pp=2, out=out))
    with pytest.raises(ValueError, match="micro_batches splits the batch for --pp"):
        train(TrainConfig(micro_batches=2, out=out))
    with pytest.raises(ValueError, match=r"micro_batches \(3\) must divide batch_size \(16\)"):
        train(TrainConfig(pp=2, micro_batches=3, out=out))
    with pytest.raises(ValueError, match="TrainConfig.pp must be an int >= 1"):
        train(TrainConfig(pp=0, out=out))
