"""A pipeline runtime: execute a schedule from ``schedules.py`` over point-to-point sends.

Each rank holds its stages (``Stage``: consecutive ``DecoderLayer``s; two per rank for DualPipe
and DualPipeV) and runs its op list in order:

* ``F``: take the input (the data on a first stage, else the activation the previous stage
  sent), run the stage, send the output on — or, on a last stage, compute the loss;
* ``B``: take the output's gradient (from the next stage, or the loss), backpropagate through
  the stage, send the input's gradient back;
* ``I`` / ``W``: the same backward split in two (ZeroBubble): ``I`` computes only the input's
  gradient (``torch.autograd.grad`` w.r.t. the input, keeping the graph), ``W`` later only the
  weights' (``torch.autograd.grad`` w.r.t. the parameters). This split re-walks the graph in W;
  DualPipe's repository instead defers just the weight GEMMs — cheaper, same result;
* ``FB``: its F and its B one after the other. Their communication overlaps on a GPU in the
  real DualPipe; here the pair only keeps the schedule's order.

Messages between two ranks are received in the order they were sent: every rank derives, from
the schedule, the sequence of messages on each (sender, receiver) channel, and posts its receives
in that order, buffering any that arrive before they are needed. That keeps the transfers
matched without tags (NCCL has none), and cannot deadlock when the schedule itself cannot (the
simulator checks that).

DualPipe runs two copies of each stage (one per direction), on ranks r and PP-1-r; after the
step, each pair of ranks adds its copies' gradients, so both copies take the same update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..model.block import DecoderLayer
from ..model.losses import sequence_balance_loss
from ..model.rope import RotaryEmbedding
from .launch import check_same_on_all_ranks
from .schedules import Layout, Op, layout, micro_batches_per_pipe, schedule


def causal_inputs(
    rotary: RotaryEmbedding, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """cos, sin for positions 0..seq_len-1 and the additive causal mask (None for one token)."""
    positions = torch.arange(seq_len, device=device)
    cos, sin = rotary(positions)
    mask = None
    if seq_len > 1:
        mask = torch.full((seq_len, seq_len), float("-inf"), device=device).triu(1)
    return cos, sin, mask


class Stage(nn.Module):
    """Consecutive decoder layers as one pipeline stage: hidden states in, hidden states out.

    ``PipelineRuntime`` sends tensors shaped like its first input, hidden-sized, so a first stage
    that embeds tokens (``embed``) receives the ids as channel 0 of a float tensor (exact below
    2^24). ``held`` are modules this stage trains that its forward does not run: a training
    pipeline's last stage holds the final norm, the head and the MTP modules, which its loss
    function runs (``DeepSeekV3.outputs``).

    The runtime moves tensors only, so what the layers routed stays here: ``loads`` sums each
    MoE layer's per-expert counts over the forwards since ``reset()`` (the bias update wants
    the whole step's). With ``alpha``, every forward adds its MoE layers' sequence-wise balance
    loss (eqs. 17–20), divided by ``micro_batches`` as the runtime divides the final loss, in
    the backward (``_AddLoss``): a middle stage never sees the final loss. ``balance`` sums
    those terms (detached) for the log.
    """

    def __init__(
        self,
        layers: list[DecoderLayer],
        rotary: RotaryEmbedding,
        *,
        embed: nn.Embedding | None = None,
        held: list[nn.Module] | None = None,
        alpha: float | None = None,
        micro_batches: int = 1,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.rotary, self.embed = rotary, embed
        self.held = nn.ModuleList(held or [])
        self.alpha, self.micro_batches = alpha, micro_batches
        self.reset()

    def reset(self) -> None:
        """Forget the loads and balance terms of the previous step."""
        self.loads: list[torch.Tensor] = []
        self.balance = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x[..., 0].long())
        cos, sin, mask = causal_inputs(self.rotary, x.shape[1], x.device)
        routing = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, mask)
            if r is not None:
                routing.append(r)
        loads = [r.load for r in routing]
        self.loads = [a + b for a, b in zip(self.loads, loads)] if self.loads else loads
        if self.alpha is None or not routing:
            return x
        balance = sum(sequence_balance_loss(r, x.shape[0], self.alpha) for r in routing)
        self.balance = self.balance + balance.detach() / self.micro_batches
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


def build_stages(config: ModelConfig, pp: int, seed: int = 0) -> list[Stage]:
    """All ``num_hidden_layers`` layers, seeded (the same on every rank), cut into ``pp`` stages.

    Weights are N(0, 0.05), norms 1 ± 0.1, so that every parameter has a gradient worth checking.
    """
    n = config.num_hidden_layers
    if n % pp:
        raise ValueError(
            f"ModelConfig.num_hidden_layers ({n}) must be divisible by the pipeline stages ({pp})"
        )
    torch.manual_seed(seed)
    layers = [DecoderLayer(config, i) for i in range(n)]
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                p.copy_(
                    1.0 + 0.1 * torch.randn_like(p)
                    if "norm" in name
                    else 0.05 * torch.randn_like(p)
                )
    per = n // pp
    return [Stage(layers[s * per : (s + 1) * per], RotaryEmbedding(config)) for s in range(pp)]


@dataclass
class StepResult:
    """What one rank saw: losses of the micro-batches that ended here ((pipe, mb) -> loss), and
    the wall-clock (op, start, end) of every op, in seconds since the step began."""

    losses: dict[tuple[int, int], float]
    timeline: list[tuple[Op, float, float]]


class _Channels:
    """Point-to-point messages, received in the order each sender sends them."""

    def __init__(
        self, lay: Layout, plans: list[list[Op]], rank: int, like: torch.Tensor, group
    ) -> None:
        self.like, self.group = like, group  # every message has the shape and dtype of `like`
        self.expected: dict[int, list[tuple]] = {}  # sender -> keys in sending order
        for src, ops in enumerate(plans):
            for op in ops:
                for part in op.parts():
                    dst, key = _message(lay, src, part)
                    if dst == rank and src != rank:
                        self.expected.setdefault(src, []).append(key)
        self.cursor = {src: 0 for src in self.expected}
        self.arrived: dict[tuple, torch.Tensor] = {}
        self.sends: list = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.detach().contiguous()
        self.sends.append((dist.isend(tensor, _global(dst, self.group), group=self.group), tensor))

    def recv(self, key: tuple, src: int) -> torch.Tensor:
        while key not in self.arrived:
            next_key = self.expected[src][self.cursor[src]]
            buf = torch.empty_like(self.like)
            dist.irecv(buf, _global(src, self.group), group=self.group).wait()
            self.arrived[next_key] = buf
            self.cursor[src] += 1
        return self.arrived.pop(key)

    def finish(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()


def _global(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _message(lay: Layout, rank: int, op: Op) -> tuple[int, tuple]:
    """(destination rank, key) of what ``op`` sends; destination == rank when it stays local."""
    pipe, stage = lay.stage(rank, op.chunk)
    if op.kind == "F" and stage < lay.pp - 1:
        return lay.owner(pipe, stage + 1)[0], ("act", pipe, op.mb, stage + 1)
    if op.kind in ("B", "I") and stage > 0:
        return lay.owner(pipe, stage - 1)[0], ("grad", pipe, op.mb, stage - 1)
    return rank, ()


class PipelineRuntime:
    """Runs ``kind``'s schedule on this rank with its ``stages`` (one per chunk it holds)."""

    def __init__(
        self,
        kind: str,
        stages: list[Stage],
        pp: int,
        micro_batches: int,
        config: ModelConfig,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.lay = layout(kind, pp)  # raises on an odd DualPipe, on every rank
        world = dist.get_world_size(group)
        if world != self.lay.ranks:
            raise ValueError(
                f"{kind} with pp={pp} stages runs on {self.lay.ranks} ranks, the group has {world}"
            )
        if len(stages) != self.lay.chunks:
            raise ValueError(f"{kind} needs {self.lay.chunks} stage(s) per rank, got {len(stages)}")
        check_same_on_all_ranks(
            (kind, pp, micro_batches, config.to_dict()), "pipeline setup", group
        )
        self.kind, self.stages, self.group = kind, stages, group
        self.rank = dist.get_rank(group)
        self.n_per_pipe = micro_batches_per_pipe(kind, pp, micro_batches)
        self.micro_batches = micro_batches
        self.plans = schedule(kind, pp, micro_batches)

    def step(
        self,
        inputs: list[torch.Tensor],
        targets: list[torch.Tensor],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> StepResult:
        """One training step over ``micro_batches`` micro-batches (inputs/targets: one tensor per
        micro-batch, the same on every rank; pipe p's micro-batch m is number p·n + m). Each
        loss is divided by the micro-batch count, so the gradients are those of the mean loss.
        Gradients accumulate into the stages' ``.grad``; returns this rank's losses and ops."""
        lay, rank = self.lay, self.rank
        chan = _Channels(lay, self.plans, rank, inputs[0], self.group)
        local: dict[tuple, torch.Tensor] = {}  # messages between this rank's own two chunks
        saved: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output or loss)
        pending_w: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (output, its gradient)
        losses: dict[tuple[int, int], float] = {}
        timeline: list[tuple[Op, float, float]] = []
        t0 = time.perf_counter()

        def take(key: tuple, owner: int) -> torch.Tensor:
            return local.pop(key) if owner == rank else chan.recv(key, owner)

        def put(part: Op, tensor: torch.Tensor) -> None:
            dst, key = _message(lay, rank, part)
            if dst == rank:
                local[key] = tensor.detach()
            else:
                chan.send(tensor, dst)

        def forward(op: Op) -> None:
            pipe, stage = lay.stage(rank, op.chunk)
            n = pipe * self.n_per_pipe + op.mb
            if stage == 0:
                x = inputs[n]
            else:
                x = take(("act", pipe, op.mb, stage), lay.owner(pipe, stage - 1)[0])
            x = x.detach().requires_grad_()
            y = self.stages[op.chunk](x)
            if stage == lay.pp - 1:
                y = loss_fn(y, targets[n]) / self.micro_batches
                losses[(pipe, op.mb)] = y.item()
            else:
                put(op, y)
            saved[(op.chunk, op.mb)] = (x, y)

        def backward(op: Op) -> None:
            pipe, stage = lay.stage(rank, op.chunk)
            x, y = saved.pop((op.chunk, op.mb))
            grad = None
            if stage < lay.pp - 1:
                grad = take(("grad", pipe, op.mb, stage), lay.owner(pipe, stage + 1)[0])
            if op.kind == "B":
                torch.autograd.backward(y, grad)
                grad_x = x.grad
            else:  # I: the input's gradient only; W comes later on the same graph
                (grad_x,) = torch.autograd.grad(y, x, grad, retain_graph=True)
                pending_w[(op.chunk, op.mb)] = (y, grad)
            if stage > 0:
                put(op, grad_x)

        def weights(op: Op) -> None:
            y, grad = pending_w.pop((op.chunk, op.mb))
            params = [p for p in self.stages[op.chunk].parameters() if p.requires_grad]
            grads = torch.autograd.grad(y, params, grad, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g

        run = {"F": forward, "B": backward, "I": backward, "W": weights}
        for op in self.plans[rank]:
            start = time.perf_counter() - t0
            for part in op.parts():
                run[part.kind](part)
            timeline.append((op, start, time.perf_counter() - t0))
        chan.finish()
        if self.kind == "dualpipe":
            self._sum_copies()
        return StepResult(losses, timeline)

    def _sum_copies(self) -> None:
        """DualPipe: ranks r and PP-1-r hold the same two stages (chunks swapped); add up."""
        partner = self.lay.ranks - 1 - self.rank
        mine = [self._flat_grads(c) for c in (0, 1)]
        theirs = [torch.empty_like(mine[1]), torch.empty_like(mine[0])]  # partner's chunk order
        ops = [dist.P2POp(dist.isend, g, _global(partner, self.group), self.group) for g in mine]
        ops += [dist.P2POp(dist.irecv, g, _global(partner, self.group), self.group) for g in theirs]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for chunk in (0, 1):  # my chunk c is the partner's chunk 1-c
            total = mine[chunk] + theirs[1 - chunk]
            offset = 0
            for p in self.stages[chunk].parameters():
                p.grad.copy_(total[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _flat_grads(self, chunk: int) -> torch.Tensor:
        params = list(self.stages[chunk].parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return torch.nn.utils.parameters_to_vector([p.grad for p in params])


def stage_indices(kind: str, pp: int, rank: int) -> list[int]:
    """The stages (by index in the model) that ``rank`` holds, chunk 0 first."""
    lay = layout(kind, pp)
    return [lay.stage(rank, c)[1] for c in range(lay.chunks)]
