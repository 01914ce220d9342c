"""The pipeline runtime on gloo processes: 1F1B, ZB1P, DualPipe and DualPipeV give the losses and
gradients of the same layers run on one process; bad setups fail on every rank."""

from __future__ import annotations

import pytest
import torch

from dsv3lite.config import preset
from dsv3lite.parallel.launch import RankFailure, launch
from dsv3lite.parallel.pipeline import PipelineRuntime, build_stages
from dsv3lite.testing.pipeline import run_and_check

CONFIG = dict(num_hidden_layers=4, n_routed_experts=8, n_group=2, topk_group=1)
CASES = {  # ranks -> (kind, stages, micro-batches)
    4: [("1f1b", 4, 6), ("zb1p", 4, 5), ("dualpipe", 4, 8)],
    2: [("dualpipe", 2, 4), ("dualpipev", 4, 6)],
}


def _cases_worker(cases: list[tuple]) -> list[dict]:
    """Several cases in one launch: a fresh process's first GEMMs are slow."""
    return [run_and_check(kind, pp, m, overrides=CONFIG, warmup=False) for kind, pp, m in cases]


@pytest.fixture(scope="module")
def pipeline_runs() -> dict:
    return {w: launch(_cases_worker, w, cases, timeout_s=90) for w, cases in CASES.items()}


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ranks, case", [(w, i) for w in CASES for i in range(len(CASES[w]))])
def test_pipeline_matches_single_process(pipeline_runs, ranks, case):
    kind, pp, micro_batches = CASES[ranks][case]
    results = [per_rank[case] for per_rank in pipeline_runs[ranks]]
    n_per_pipe = micro_batches // 2 if kind == "dualpipe" else micro_batches
    losses = {}
    for res in results:
        for (pipe, mb), loss in res["losses"].items():
            losses[pipe * n_per_pipe + mb] = loss
    assert sorted(losses) == list(range(micro_batches))
    torch.testing.assert_close(
        torch.tensor([losses[i] for i in range(micro_batches)]),
        torch.tensor(results[0]["ref_losses"]),
    )
    copies = {}
    for res in results:
        assert res["grad_error"] < 1e-5, (kind, res["stages"], res["grad_error"])
        for stage in res["stages"]:
            copies[stage] = copies.get(stage, 0) + 1
    assert copies == {s: (2 if kind == "dualpipe" else 1) for s in range(pp)}


def _odd_dualpipe_worker() -> None:
    config = preset("tiny", **CONFIG)
    PipelineRuntime("dualpipe", build_stages(config, 1, 0)[:1] * 2, 3, 6, config)


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_dualpipe_on_odd_ranks_fails_everywhere():
    with pytest.raises(RankFailure) as info:
        launch(_odd_dualpipe_worker, 3, timeout_s=30)
    assert sorted(info.value.failures) == [0, 1, 2]
    assert all("even number of pipeline stages" in m for m in info.value.failures.values())
