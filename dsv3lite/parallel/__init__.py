"""Overlapped communication (report §3.2): expert parallelism, two-micro-batch overlap, DualPipe.

* ``launch``          — process groups: ``init_distributed`` under torchrun, ``launch`` for N
                        local ranks (tests, notebooks); NCCL on GPUs, gloo on CPUs;
* ``expert_parallel`` — routed experts sharded over ranks, all-to-all dispatch/combine (FP8
                        dispatch optional), differentiable, plugged into the model's MoE
                        layers as their dispatcher (§3.2.2);
* ``overlap``         — the two-micro-batch schedule (one micro-batch's dispatch/combine
                        under the other's compute), and a per-rank timeline that measures
                        how much is hidden;
* ``schedules``       — 1F1B, ZB1P, DualPipe, DualPipeV and a dependency-driven simulator
                        (Table 2, Figure 5, §3.2.1);
* ``pipeline``        — a runtime that executes those schedules over point-to-point sends.
"""

from .expert_parallel import (
    ExpertParallelDispatcher,
    all_to_all,
    reduce_gradients,
    shard_moe,
    shard_moe_layers,
)
from .launch import (
    DistInfo,
    RankFailure,
    check_same_on_all_ranks,
    init_distributed,
    launch,
    teardown,
)
from .overlap import Timeline, plot_timeline
from .pipeline import PipelineRuntime, Stage, build_stages, stage_indices
from .schedules import KINDS, Op, Simulation, plot_schedule, schedule, simulate, table2

__all__ = [
    "DistInfo",
    "ExpertParallelDispatcher",
    "KINDS",
    "Op",
    "PipelineRuntime",
    "RankFailure",
    "Simulation",
    "Stage",
    "Timeline",
    "all_to_all",
    "build_stages",
    "check_same_on_all_ranks",
    "init_distributed",
    "launch",
    "plot_schedule",
    "plot_timeline",
    "reduce_gradients",
    "schedule",
    "shard_moe",
    "shard_moe_layers",
    "simulate",
    "stage_indices",
    "table2",
    "teardown",
]
