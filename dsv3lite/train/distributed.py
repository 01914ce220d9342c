"""Training on several processes started by torchrun: expert parallelism (EP) or a pipeline (PP).

``train()`` runs one loop whatever the layout; what differs is gathered in a ``Parallel`` object,
which ``setup_parallel`` picks from ``--ep`` / ``--pp`` after checking torchrun's WORLD_SIZE:

* ``Parallel`` — one process: the plain step.
* ``ExpertParallel`` — every rank keeps 1/EP of each MoE layer's routed experts (§3.2.2) and a
  copy of everything else, and is a data-parallel rank too: it draws its own batches (data seed
  + rank). ``reduce_gradients`` averages the replicated gradients and scales the experts', so
  all are those of the mean loss over every rank's tokens. Every loss term is a mean over
  equally many tokens (or sequences) on each rank, so the mean of the ranks' means is the mean
  over the concatenated batch: one EP step equals one single-process step on that batch.
* ``PipelineParallel`` — the decoder layers cut into PP consecutive stages, one per rank: the
  embedding on the first, the final norm, the head, the MTP modules and the loss on the last,
  run by ``parallel.pipeline``'s 1F1B schedule over micro-batches of the batch. Each
  micro-batch's loss is divided by their number, so the gradients are the full batch's.

Every layout computes the losses with the model's own ``forward`` (or, on a pipeline's last
stage, ``DeepSeekV3.outputs``) and reads the step's loads from the ``Routing`` it returns.

What the layouts share:

* clipping on the *global* gradient norm: each parameter's square is counted by exactly one
  rank (EP: the replicated ones — identical after the reduction — by rank 0, the experts by
  their owner; PP: each by its stage), then one all-reduce;
* the aux-loss-free bias update from the step's loads summed over the ranks, applied by every
  rank to every layer, so that the biases never drift apart;
* rank 0 alone logs, plots and writes checkpoints, in the single-process format: EP gathers
  the experts to it first, PP pulls every stage's weights.

PP keeps the whole model on every rank (seeded alike) but trains and runs only its stage's
part; the rest is a stale copy that ``synced`` refreshes from the stages' owners before an
evaluation or a checkpoint. Parameter memory is therefore not partitioned — fine at this
scale, and evaluation reuses the plain model; activations and compute are partitioned.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model import DeepSeekV3, ModelOutput
from ..model.moe import MoE
from ..parallel.expert_parallel import reduce_gradients, shard_moe_layers, sharded_experts
from ..parallel.launch import DistInfo, check_same_on_all_ranks, init_distributed, teardown
from ..parallel.pipeline import PipelineRuntime, Stage
from .config import TrainConfig


def setup_parallel(cfg: TrainConfig) -> Parallel:
    """The layout ``cfg.ep`` / ``cfg.pp`` ask for. With more than one rank: check that torchrun
    started ep·pp processes, join the process group (NCCL with ``--device cuda``, each process on
    GPU LOCAL_RANK; gloo on CPU), and check that every rank runs the same configuration."""
    ranks = cfg.ep * cfg.pp
    world = os.environ.get("WORLD_SIZE")
    if ranks == 1:
        if world not in (None, "1"):
            raise ValueError(
                f"{world} processes were started (WORLD_SIZE={world}) but --ep 1 --pp 1 trains on "
                f"one: pass --ep {world} or --pp {world}, or start a single process"
            )
        return Parallel(torch.device(cfg.device))
    if world is None:
        raise ValueError(
            f"--ep {cfg.ep} --pp {cfg.pp} trains on {ranks} processes: start it with "
            f"torchrun --nproc-per-node {ranks} -m dsv3lite train ..."
        )
    if int(world) != ranks:
        raise ValueError(
            f"--ep {cfg.ep} × --pp {cfg.pp} = {ranks} ranks, but WORLD_SIZE={world}: torchrun's "
            "--nproc-per-node must equal ep·pp"
        )
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(
            "TrainConfig.device under torchrun must be 'cpu' (gloo) or 'cuda' (NCCL, one GPU per "
            f"process, LOCAL_RANK), got {cfg.device!r}"
        )
    owns_group = not dist.is_initialized()  # under launch() the group already exists
    # cfg.timeout_s: long enough for rank 0 to write a checkpoint and plots while the others
    # wait, short enough that a frozen or dead rank ends the run soon
    info = init_distributed("nccl" if cfg.device == "cuda" else "gloo", cfg.timeout_s)
    check_same_on_all_ranks(dataclasses.asdict(cfg), "TrainConfig")
    if cfg.ep > 1:
        return ExpertParallel(info, owns_group, cfg.ep_overlap)
    return PipelineParallel(info, owns_group, cfg)


def logged_losses(out: ModelOutput) -> dict[str, torch.Tensor]:
    """The metrics row's loss fields from a ``ModelOutput`` (MTP: depth 1)."""
    logged = {"loss": out.main_loss.detach()}
    if out.mtp_losses:
        logged["mtp_loss"] = out.mtp_losses[0].detach()
    if out.balance_loss is not None:
        logged["balance_loss"] = out.balance_loss.detach()
    return logged


class Parallel:
    """One process, the plain step; the distributed layouts override what differs."""

    rank = 0
    dp_rank, dp_size = 0, 1  # data parallelism: whose batches this rank draws, out of how many

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.trained: nn.Module | None = None
        self.step_loads: list[torch.Tensor] = []  # the last step's, per MoE layer

    @property
    def is_main(self) -> bool:
        """Rank 0: it logs, plots and writes the checkpoints."""
        return self.rank == 0

    def prepare(self, model: DeepSeekV3) -> nn.Module:
        """Turn ``model`` into this rank's part of the layout; return the module whose
        parameters this rank trains (its optimizer's)."""
        self.trained = model
        return model

    def check_same(self, value: Any, what: str) -> None:
        """Raise unless every rank holds the same ``value`` (one process: nothing to check)."""

    def forward_backward(
        self, model: DeepSeekV3, x: torch.Tensor, y: torch.Tensor, loss_args: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Losses (``model(x, labels=y, **loss_args)``) and gradients of one batch; keeps the
        step's loads; returns the loss fields to log."""
        out = model(x, labels=y, **loss_args)
        out.loss.backward()
        self.step_loads = [r.load for r in out.routing]
        return logged_losses(out)

    def clip_grad_norm_(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), max_norm)

    def loads(self) -> list[torch.Tensor]:
        """Per MoE layer (``model.moe_layers()`` order), how many tokens of the last step each
        expert received."""
        return self.step_loads

    def reduce_logged(self, logged: dict[str, torch.Tensor]) -> dict[str, float]:
        """The logged losses of the whole step (one host sync: call it on logging steps only)."""
        return {k: v.item() for k, v in logged.items()}

    def mean(self, value: float) -> float:
        """A per-rank statistic (the validation loss) averaged over the data-parallel ranks."""
        return value

    def synced(self, model: DeepSeekV3) -> DeepSeekV3:
        """``model`` with every weight current on this rank, to evaluate it."""
        return model

    def full_model(self, model: DeepSeekV3) -> DeepSeekV3 | None:
        """On rank 0, the complete single-process model to save; None on the other ranks."""
        return model

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
        return [obj]

    def close(self) -> None:
        """Wait for every rank, then leave the process group if ``setup_parallel`` joined it."""


class _Distributed(Parallel):
    """What EP and PP share: the process group, object gathering, the global-norm clip."""

    def __init__(self, info: DistInfo, owns_group: bool) -> None:
        super().__init__(info.device)
        self.rank, self.world_size, self.owns_group = info.rank, info.world_size, owns_group
        self.counted: list[nn.Parameter] = []  # the parameters whose squares this rank adds

    def check_same(self, value: Any, what: str) -> None:
        check_same_on_all_ranks(value, what)

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(_to_cpu(obj), out, dst=0)  # CPU: rank 0 must not unpickle on GPU r
        return out

    def clip_grad_norm_(self, max_norm: float) -> None:
        """torch's clip_grad_norm_ over every rank's parameters at once: the squared norm summed
        over ranks (each parameter counted once), the same coefficient applied everywhere."""
        square = torch.zeros((), device=self.device)
        for p in self.counted:
            if p.grad is not None:
                square += p.grad.float().pow(2).sum()
        dist.all_reduce(square)
        coef = (max_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.trained.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    def close(self) -> None:
        dist.barrier()
        if self.owns_group:
            teardown()


class ExpertParallel(_Distributed):
    """EP over all ranks, which are data-parallel for everything but the routed experts."""

    def __init__(self, info: DistInfo, owns_group: bool, overlap: bool = False) -> None:
        super().__init__(info, owns_group)
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.overlap = overlap  # the two-micro-batch overlap (parallel/overlap.py)

    def prepare(self, model: DeepSeekV3) -> nn.Module:
        shard_moe_layers(model, overlap=self.overlap)
        experts = sharded_experts(model)
        self.counted = [p for n, p in model.named_parameters() if n in experts or self.is_main]
        return super().prepare(model)

    def forward_backward(self, model, x, y, loss_args):
        logged = super().forward_backward(model, x, y, loss_args)
        reduce_gradients(model)
        return logged

    def loads(self):
        if not self.step_loads:
            return []
        total = torch.stack(self.step_loads)
        dist.all_reduce(total)
        return list(total)

    def reduce_logged(self, logged):
        values = torch.stack(list(logged.values()))
        dist.all_reduce(values)
        return dict(zip(logged, (values / self.world_size).tolist()))

    def mean(self, value: float) -> float:
        total = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def full_model(self, model):
        state = _gathered_state(model, self.world_size)
        if not self.is_main:
            return None
        with torch.device("meta"):  # no storage, no init: every tensor comes from `state`
            full = DeepSeekV3(model.config)
        full.load_state_dict(state, assign=True)
        return full


class PipelineParallel(_Distributed):
    """PP stages on PP ranks, run by the 1F1B schedule; see the module docstring."""

    def __init__(self, info: DistInfo, owns_group: bool, cfg: TrainConfig) -> None:
        super().__init__(info, owns_group)
        self.pp = cfg.pp
        self.micro_batches = cfg.micro_batches or _largest_divisor(cfg.batch_size, 2 * cfg.pp)
        self.alpha = cfg.loss_args()["alpha"]  # each stage adds its layers' balance term
        self.seq_len = cfg.seq_len

    def prepare(self, model: DeepSeekV3) -> nn.Module:
        config = model.config
        n = config.num_hidden_layers
        if self.pp > n:
            raise ValueError(
                f"--pp {self.pp} needs at least {self.pp} decoder layers, one per stage; "
                f"ModelConfig.num_hidden_layers is {n}"
            )
        # what the last stage logs (logged_losses); every rank needs the keys for the reduce
        self.keys = ["loss"]
        self.keys += ["mtp_loss"] if config.num_nextn_predict_layers and self.seq_len > 1 else []
        self.keys += ["balance_loss"] if self.alpha is not None else []
        bounds = [s * n // self.pp for s in range(self.pp + 1)]
        self.owner = {name: _owner(name, bounds) for name, _ in model.named_parameters()}
        first, last = self.rank == 0, self.rank == self.pp - 1
        backbone = model.model
        layers = [backbone.layers[i] for i in range(bounds[self.rank], bounds[self.rank + 1])]
        held = []
        # MTP embeds tokens on the last stage (and a tied head is the embedding): two copies
        if last and (backbone.mtp or config.tie_word_embeddings):
            held.append(backbone.embed_tokens)
        if last:
            held += [backbone.norm, model.lm_head, backbone.mtp]
        self.stage = Stage(
            layers,
            backbone.rotary_emb,
            embed=backbone.embed_tokens if first else None,
            held=held,
            alpha=self.alpha,
            micro_batches=self.micro_batches,
        )
        self.moe_layers = model.moe_layers()
        self.stage_moes = [layer.mlp for layer in layers if isinstance(layer.mlp, MoE)]
        self.mtp_moes = [m for m in backbone.mtp.modules() if isinstance(m, MoE)] if last else []
        self.mtp_loads: list[torch.Tensor] = []
        self.shared = None
        if config.num_nextn_predict_layers or config.tie_word_embeddings:
            self.shared = model.model.embed_tokens.weight
            self.pair = dist.new_group([0, self.pp - 1])  # every rank takes part in new_group
        self.counted = [p for name, p in model.named_parameters() if self.owner[name] == self.rank]
        self.runtime = PipelineRuntime("1f1b", [self.stage], self.pp, self.micro_batches, config)
        self.trained = self.stage
        return self.stage

    def forward_backward(self, model, x, y, loss_args):
        logged = {k: torch.zeros((), device=x.device) for k in self.keys}
        self.stage.reset()
        self.mtp_loads = []
        # the runtime moves hidden-sized float tensors only: ids ride in channel 0 (see Stage)
        carrier = torch.zeros(*x.shape, model.config.hidden_size, device=x.device)
        carrier[..., 0] = x
        windows = torch.cat([x, y[:, -1:]], dim=1)  # inputs and targets for the last stage
        m = self.micro_batches
        loss_fn = functools.partial(self._loss, model, loss_args, logged)
        self.runtime.step(list(carrier.chunk(m)), list(windows.chunk(m)), loss_fn)
        if self.shared is not None and self.rank in (0, self.pp - 1):
            if self.shared.grad is None:
                self.shared.grad = torch.zeros_like(self.shared)
            dist.all_reduce(self.shared.grad, group=self.pair)
        if self.alpha is not None:
            logged["balance_loss"] += self.stage.balance.to(x.device)
        return logged

    def _loss(
        self,
        model: DeepSeekV3,
        loss_args: dict[str, Any],
        logged: dict[str, torch.Tensor],
        h: torch.Tensor,
        windows: torch.Tensor,
    ) -> torch.Tensor:
        """The last stage's loss on one micro-batch: norm, head, MTP, and the MTP modules'
        balance loss (``routing=[]``: each stage adds its own layers'); the runtime divides it
        by their count."""
        x, y = windows[:, :-1], windows[:, 1:]
        out = model.outputs(model.model.norm(h), x, y, [], **loss_args)
        loads = [r.load for r in out.routing]
        self.mtp_loads = [a + b for a, b in zip(self.mtp_loads, loads)] if self.mtp_loads else loads
        for key, value in logged_losses(out).items():
            logged[key] += value / self.micro_batches
        return out.loss

    def loads(self):
        if not self.moe_layers:
            return []
        mine = dict(zip(self.stage_moes, self.stage.loads))
        mine.update(zip(self.mtp_moes, self.mtp_loads))
        zero = torch.zeros_like(self.moe_layers[0].gate.e_score_correction_bias, dtype=torch.long)
        total = torch.stack([mine.get(moe, zero) for moe in self.moe_layers])
        dist.all_reduce(total)
        return list(total)

    def reduce_logged(self, logged):
        values = torch.stack(list(logged.values()))
        dist.all_reduce(values)  # only the ranks that computed a term hold a non-zero
        return dict(zip(logged, values.tolist()))

    def synced(self, model):
        for name, p in model.named_parameters():  # the same order on every rank
            dist.broadcast(p.data, src=self.owner[name])
        return model

    def full_model(self, model):
        self.synced(model)
        return model if self.is_main else None


def _owner(name: str, bounds: list[int]) -> int:
    """The stage that trains parameter ``name``: the embedding the first, a decoder layer its
    stage, the final norm, the head and the MTP modules the last."""
    if name.startswith("model.embed_tokens."):
        return 0
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return max(s for s in range(len(bounds) - 1) if bounds[s] <= layer)
    return len(bounds) - 2


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _local_part(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The part of the single-process model's tensor ``name`` that this rank of the sharded
    ``model`` holds: for a stack of experts, its experts' rows; else all of it."""
    shard = sharded_experts(model).get(name)
    return tensor if shard is None else tensor[shard.first_expert :][: shard.n_local]


def _gathered_state(model: nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The single-process state dict, on every rank: each stack of sharded experts
    all-gathered (rank r holds experts r·n_local … (r+1)·n_local - 1) and concatenated."""
    sharded = sharded_experts(model)
    state = {}
    for name, tensor in model.state_dict().items():
        if name in sharded:
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous())
            tensor = torch.cat(parts)
        state[name] = tensor
    return state


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (an optimizer state dict) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
