"""The benchmark package: every suite's CPU quick run, the table and JSON format, the train
suite's transformers row, and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3lite import bench
from dsv3lite.accounting import count_parameters
from dsv3lite.bench.harness import Results, Row, format_table, record
from dsv3lite.bench.train import train_flops_per_token
from dsv3lite.config import preset

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: a second thread saves nothing and fights the other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_record(data: dict, suite: str) -> dict[str, dict]:
    """The schema notebooks read: suite, quick, env, rows (name, shape, median_ms, value,
    unit, note), ratios (name, value); returns the rows by name."""
    json.dumps(data)
    assert data["suite"] == suite and data["quick"] is True
    assert {"device", "device_type", "torch", "triton", "python", "date"} <= data["env"].keys()
    rows = {r["name"]: r for r in data["rows"]}
    assert len(rows) == len(data["rows"]), "row names are unique"
    for r in data["rows"]:
        assert {"name", "shape", "median_ms", "value", "unit", "note"} <= r.keys()
        assert r["median_ms"] is None or r["median_ms"] > 0
    assert all({"name", "candidate", "baseline", "value"} <= r.keys() for r in data["ratios"])
    return rows


def test_table_and_json_format():
    res = Results(ceilings={"copy_gbs": 4000.0, "gemm_tflops": 700.0})
    res.rows += [
        Row("fast", "8x8", 1.0, 200.0, "GB/s", "ours", {"impl": "a"}),
        Row("slow", "8x8", 4.0, 50.0, "GB/s"),
        Row("skipped", "8x8", None, note="skipped: needs CUDA"),
    ]
    res.ratio("fast / slow", "fast", "slow")
    res.ratio("fast / slow by value", "fast", "slow", by="value")
    res.ratio("nothing to compare", "fast", "skipped")
    assert [r.value for r in res.ratios] == [4.0, 4.0]
    env = bench.harness.environment(CPU)
    data = record("demo", True, env, res)
    assert data["ceilings"]["copy_gbs"] == 4000.0
    assert data["rows"][0] == {
        "name": "fast",
        "shape": "8x8",
        "median_ms": 1.0,
        "value": 200.0,
        "unit": "GB/s",
        "note": "ours",
        "impl": "a",
    }
    table = format_table("demo", env, res)
    assert "ceilings: copy 4,000 GB/s, bf16 GEMM 700 TFLOP/s" in table
    assert "skipped: needs CUDA" in table and "fast / slow" in table and "4.00x" in table


def test_model_quick_from_the_command_line(tmp_path):
    path = tmp_path / "model.json"
    cmd = [sys.executable, "-m", "dsv3lite", "bench", "model", "--quick", "--device", "cpu"]
    out = subprocess.run(
        [*cmd, "--out", str(path)], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    rows = _check_record(json.loads(path.read_text()), "model")
    expected = [
        "forward ours naive",
        "forward ours absorb",
        "decode naive @256",
        "decode absorb @256",
    ]
    for name in expected:
        assert rows[name]["value"] > 0 and rows[name]["unit"] == "tokens/s" and name in out
    # The latent cache is the smaller one: 48 vs 320 values per token per layer for tiny.
    naive, absorb = rows["decode naive @256"], rows["decode absorb @256"]
    assert absorb["cache_bytes"] * 320 == naive["cache_bytes"] * 48
    ratios = {r["name"]: r["value"] for r in json.loads(path.read_text())["ratios"]}
    assert ratios["decode @256: absorb vs naive"] == pytest.approx(
        naive["median_ms"] / absorb["median_ms"]
    )


def test_train_quick_has_the_transformers_row(capsys):
    rows = _check_record(bench.measure("train", device=CPU, quick=True), "train")
    for name in ("train transformers", "train ours", "train ours +MTP"):
        row = rows[name]
        assert row["unit"] == "tokens/s" and row["value"] > 0, name
        assert 0 < row["mfu"] < 1 and row["launches_per_step"] > 0 and row["recompiles"] == 0
        assert row["launch_unit"] == "aten ops"  # the CPU has no kernels to count
    assert "sdpa" in rows["train transformers"]["note"]
    assert rows["train ours +MTP"]["flops_per_token"] > rows["train ours"]["flops_per_token"]
    assert "ours / transformers (MTP off)" in capsys.readouterr().out


def test_train_flops_and_the_medium_preset():
    tiny = preset("tiny")
    assert train_flops_per_token(tiny, 256) > train_flops_per_token(tiny, 128)
    medium = preset("medium")
    pc = count_parameters(medium)
    assert medium.hidden_size >= 2048 and 1e9 <= pc.total_sum <= 2e9


def test_fp8_quick():
    rows = _check_record(bench.measure("fp8", device=CPU, quick=True), "fp8")
    assert any(n.startswith("gemm ours M") for n in rows) and "act_quant 1x128" in rows
    assert any(n.startswith("linear fp8") for n in rows)
    assert all(r["value"] > 0 for r in rows.values() if r["median_ms"] is not None)


@pytest.mark.parametrize("suite", ["mla", "moe"])
def test_kernel_suites_quick(suite):
    data = bench.measure(suite, device=CPU, quick=True)
    rows = _check_record(data, suite)
    assert data["ceilings"] == {"copy_gbs": None, "gemm_tflops": None}
    timed = [r for r in rows.values() if r["median_ms"] is not None]
    assert timed and all(r["unit"] == "GB/s" and r["rel_err"] < 2e-2 for r in timed)
    assert all({"impl", "tflops", "of_copy", "of_gemm"} <= r.keys() for r in rows.values())


def test_comm_quick():
    rows = _check_record(bench.measure("comm", device=CPU, quick=True), "comm")
    sequential = rows["cpu gloo 4 ranks layer sequential"]
    assert sequential["error"] < 1e-5 and rows["cpu gloo 4 ranks dispatch"]["unit"] == "GB/s"


def test_bad_arguments():
    from dsv3lite.__main__ import main

    for argv in (["bench", "model", "--preset", "small"], ["bench", "train", "--preset", "huge"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
