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

import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import preset
from ..model import DeepSeekV3
from ..model.moe import MoE
from ..parallel.expert_parallel import ExpertParallelMoE, reduce_gradients, shard_moe_layers
from ..parallel.launch import DistInfo, check_same_on_all_ranks, init_distributed, teardown
from ..parallel.pipeline import PipelineRuntime, causal_inputs
from .balance import sequence_balance_loss

if TYPE_CHECKING:
    from .trainer import TrainConfig

LossFn = Callable[..., dict]  # trainer._losses with its cfg bound


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
        return ExpertParallel(info, owns_group)
    return PipelineParallel(info, owns_group, cfg)


def logged_losses(losses: dict) -> dict[str, torch.Tensor]:
    """The metrics row's loss fields from ``trainer._losses``' output (MTP: depth 1)."""
    out = {"loss": losses["main"].detach()}
    if "mtp" in losses:
        out["mtp_loss"] = losses["mtp"][0].detach()
    if "balance" in losses:
        out["balance_loss"] = losses["balance"].detach()
    return out


class Parallel:
    """One process, the plain step; the distributed layouts override what differs."""

    rank = 0
    dp_rank, dp_size = 0, 1  # data parallelism: whose batches this rank draws, out of how many

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.trained: nn.Module | None = None

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
        self, model: DeepSeekV3, x: torch.Tensor, y: torch.Tensor, losses: LossFn
    ) -> dict[str, torch.Tensor]:
        """Losses and gradients of one batch; returns the loss fields to log."""
        out = losses(model, x, y)
        out["total"].backward()
        return logged_losses(out)

    def clip_grad_norm_(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.trained.parameters(), max_norm)

    def loads(self, moe_layers: list[nn.Module]) -> list[torch.Tensor]:
        """Per MoE layer, how many tokens of the step each expert received."""
        return [moe.last_routing.load for moe in moe_layers]

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

    def __init__(self, info: DistInfo, owns_group: bool) -> None:
        super().__init__(info, owns_group)
        self.dp_rank, self.dp_size = self.rank, self.world_size

    def prepare(self, model: DeepSeekV3) -> nn.Module:
        shard_moe_layers(model)
        experts = {
            id(p)
            for m in model.modules()
            if isinstance(m, ExpertParallelMoE)
            for p in m.experts.parameters()
        }
        self.counted = [p for p in model.parameters() if id(p) in experts or self.is_main]
        return super().prepare(model)

    def forward_backward(self, model, x, y, losses):
        logged = super().forward_backward(model, x, y, losses)
        reduce_gradients(model)
        return logged

    def loads(self, moe_layers):
        if not moe_layers:
            return []
        total = torch.stack(super().loads(moe_layers))
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
        self.alpha = cfg.alpha if cfg.balance == "aux-loss" else None
        self.seq_len = cfg.seq_len
        self.step_loads: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, model: DeepSeekV3) -> nn.Module:
        config = model.config
        n = config.num_hidden_layers
        if self.pp > n:
            raise ValueError(
                f"--pp {self.pp} needs at least {self.pp} decoder layers, one per stage; "
                f"ModelConfig.num_hidden_layers is {n}"
            )
        # what the last stage logs (as _losses does); every rank needs the keys for the reduce
        self.keys = ["loss"]
        self.keys += ["mtp_loss"] if config.num_nextn_predict_layers and self.seq_len > 1 else []
        self.keys += ["balance_loss"] if self.alpha is not None else []
        bounds = [s * n // self.pp for s in range(self.pp + 1)]
        self.owner = {name: _owner(name, bounds) for name, _ in model.named_parameters()}
        first, last = self.rank == 0, self.rank == self.pp - 1
        layers = range(bounds[self.rank], bounds[self.rank + 1])
        self.stage = _Stage(model, layers, first, last, self.alpha, self.micro_batches)
        # MTP embeds tokens on the last stage (and a tied head is the embedding): two copies
        self.shared = None
        if config.num_nextn_predict_layers or config.tie_word_embeddings:
            self.shared = model.model.embed_tokens.weight
            self.pair = dist.new_group([0, self.pp - 1])  # every rank takes part in new_group
        self.counted = [p for name, p in model.named_parameters() if self.owner[name] == self.rank]
        for moe in self.stage.modules():
            if isinstance(moe, MoE):
                moe.register_forward_hook(self._count_load)
        self.runtime = PipelineRuntime("1f1b", [self.stage], self.pp, self.micro_batches, config)
        self.trained = self.stage
        return self.stage

    def _count_load(self, moe: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Loads summed over the micro-batches (the bias update wants the whole step's)."""
        self.step_loads[moe] = self.step_loads.get(moe, 0) + moe.last_routing.load

    def forward_backward(self, model, x, y, losses):
        logged = {k: torch.zeros((), device=x.device) for k in self.keys}
        self.step_loads.clear()
        self.stage.balance_log = torch.zeros((), device=x.device)
        # the runtime moves hidden-sized float tensors only: ids ride in channel 0 (see _Stage)
        carrier = torch.zeros(*x.shape, model.config.hidden_size, device=x.device)
        carrier[..., 0] = x
        windows = torch.cat([x, y[:, -1:]], dim=1)  # inputs and targets for the last stage
        m = self.micro_batches
        loss_fn = functools.partial(self._loss, model, losses, logged)
        self.runtime.step(list(carrier.chunk(m)), list(windows.chunk(m)), loss_fn)
        if self.shared is not None and self.rank in (0, self.pp - 1):
            if self.shared.grad is None:
                self.shared.grad = torch.zeros_like(self.shared)
            dist.all_reduce(self.shared.grad, group=self.pair)
        if self.alpha is not None:
            logged["balance_loss"] += self.stage.balance_log
        return logged

    def _loss(
        self,
        model: DeepSeekV3,
        losses: LossFn,
        logged: dict[str, torch.Tensor],
        h: torch.Tensor,
        windows: torch.Tensor,
    ) -> torch.Tensor:
        """The last stage's loss on one micro-batch: norm, head, MTP, and the MTP modules'
        balance loss (each stage adds its own layers'); the runtime divides it by their count."""
        mtp_moes = [m for m in model.model.mtp.modules() if isinstance(m, MoE)]
        x, y = windows[:, :-1], windows[:, 1:]
        out = losses(model, x, y, h=model.model.norm(h), balance_layers=mtp_moes)
        for key, value in logged_losses(out).items():
            logged[key] += value / self.micro_batches
        return out["total"]

    def loads(self, moe_layers):
        if not moe_layers:
            return []
        zero = torch.zeros_like(moe_layers[0].gate.e_score_correction_bias, dtype=torch.long)
        total = torch.stack([self.step_loads.get(moe, zero) for moe in moe_layers])
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


class _Stage(nn.Module):
    """This rank's part of the model as one pipeline stage: hidden states in and out.

    The first stage embeds the tokens. ``PipelineRuntime`` sends tensors shaped like its first
    input, hidden-sized, so the ids arrive as channel 0 of a float tensor (exact below 2^24).
    The last stage holds the final norm, the head and the MTP modules, which its loss runs; MTP
    embeds tokens too, so it holds the embedding as well (gradients summed after the step).
    With the sequence-wise balance loss, each stage adds its own MoE layers' term in the
    backward (``_AddLoss``): a middle stage never sees the final loss.
    """

    def __init__(
        self,
        model: DeepSeekV3,
        layers: range,
        first: bool,
        last: bool,
        alpha: float | None,
        micro_batches: int,
    ) -> None:
        super().__init__()
        backbone = model.model
        self.first, self.alpha, self.micro_batches = first, alpha, micro_batches
        self.layers = nn.ModuleList(backbone.layers[i] for i in layers)
        self.rotary = backbone.rotary_emb
        if first or (last and (backbone.mtp or model.config.tie_word_embeddings)):
            self.embed = backbone.embed_tokens
        if last:
            self.norm, self.lm_head, self.mtp = backbone.norm, model.lm_head, backbone.mtp
        self.moes = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
        self.balance_log = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed(x[..., 0].long())
        cos, sin, mask = causal_inputs(self.rotary, x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        if self.alpha is None or not self.moes:
            return x
        balance = sum(
            sequence_balance_loss(moe.last_routing, x.shape[0], self.alpha) for moe in self.moes
        )
        self.balance_log = self.balance_log + balance.detach() / self.micro_batches
        return _AddLoss.apply(x, balance / self.micro_batches)


class _AddLoss(torch.autograd.Function):
    """x unchanged; in the backward, ``loss`` (a scalar computed inside a stage) gets gradient
    1, exactly as if it had been added to the final loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.dtype, ctx.device = loss.dtype, loss.device
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=ctx.dtype, device=ctx.device)


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


def _expert_key(model: nn.Module, name: str) -> tuple[str, ExpertParallelMoE, int, str] | None:
    """(prefix, shard, local index, rest) when ``name`` belongs to an EP shard's expert."""
    prefix, sep, rest = name.partition(".experts.")
    if sep:
        module = model.get_submodule(prefix)
        if isinstance(module, ExpertParallelMoE):
            j, _, tail = rest.partition(".")
            return prefix, module, int(j), tail
    return None


def _global_name(model: nn.Module, name: str) -> str:
    """A parameter's name in the single-process model: local expert j is first_expert + j."""
    key = _expert_key(model, name)
    if key is None:
        return name
    prefix, shard, j, tail = key
    return f"{prefix}.experts.{shard.first_expert + j}.{tail}"


def _gathered_state(model: nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The single-process state dict, on every rank: each shard's experts all-gathered (rank r
    holds experts r·n_local ... (r+1)·n_local - 1) under their global names."""
    state = {}
    for name, tensor in model.state_dict().items():
        key = _expert_key(model, name)
        if key is None:
            state[name] = tensor
            continue
        prefix, shard, j, tail = key
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        for r, part in enumerate(parts):
            state[f"{prefix}.experts.{r * shard.n_local + j}.{tail}"] = part
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


def step_check(
    layout: str, balance: str = "aux-free", batch_size: int = 4, seq_len: int = 16
) -> dict:
    """Run on every rank of a process group (e.g. via ``launch``): one training step of the
    ``tiny`` preset laid out as ``layout`` ('ep' or 'pp') over all ranks — then the same step on
    one process on the same tokens (EP: every rank's batch, concatenated), here, as reference.

    Clipping is made to bite (grad_clip 0.1) and the balance loss to matter (α 0.1). Returns the
    logged losses of both, and the worst relative error over the parameters this rank trains of
    their gradients (after clipping) and weights (after the step), the largest bias difference,
    and whether the step's expert loads are equal.
    """
    from .trainer import TrainConfig, _optimizer, _train_step  # here: trainer imports us

    world = dist.get_world_size()
    cfg = TrainConfig(
        **{layout: world},
        balance=balance,
        batch_size=batch_size,
        seq_len=seq_len,
        alpha=0.1,
        grad_clip=0.1,
        progress=False,
    )
    par = setup_parallel(cfg)
    torch.manual_seed(cfg.seed)
    model = DeepSeekV3(preset(cfg.preset))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    windows = torch.randint(
        0, model.config.vocab_size, (par.dp_size * batch_size, seq_len + 1), generator=g
    )
    mine = windows[par.dp_rank * batch_size : (par.dp_rank + 1) * batch_size]
    trained = par.prepare(model)
    opt = _optimizer(trained, cfg)
    x, y = mine[:, :-1], mine[:, 1:]
    logged, loads = _train_step(par, model, opt, x, y, cfg, cfg.lr, model.moe_layers())
    one = Parallel(torch.device("cpu"))
    opt = _optimizer(one.prepare(ref), cfg)
    x, y = windows[:, :-1], windows[:, 1:]
    ref_logged, ref_loads = _train_step(one, ref, opt, x, y, cfg, cfg.lr, ref.moe_layers())
    names = {id(p): name for name, p in model.named_parameters()}
    theirs = dict(ref.named_parameters())
    pairs = [(p, theirs[_global_name(model, names[id(p)])]) for p in trained.parameters()]
    return {
        "losses": par.reduce_logged(logged),
        "ref_losses": one.reduce_logged(ref_logged),
        "grad_error": max(_rel(_grad(p), _grad(q)) for p, q in pairs),
        "weight_error": max(_rel(p.detach(), q.detach()) for p, q in pairs),
        "bias_error": max(
            (a.gate.e_score_correction_bias - b.gate.e_score_correction_bias).abs().max().item()
            for a, b in zip(model.moe_layers(), ref.moe_layers())
        ),
        "loads_equal": all(torch.equal(a, b) for a, b in zip(loads, ref_loads)),
    }


def _grad(p: torch.Tensor) -> torch.Tensor:
    """An unused parameter's missing gradient is zero (an expert that got no token)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
