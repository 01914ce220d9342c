"""Benchmarks: ours and the baselines timed in one run, printed as one table, saved as JSON.

A suite is a function ``(device, quick) -> Suite`` registered in ``SUITES`` by its import
path, so suites living in other modules (fp8, mla, moe, comm, train) plug in without this
file importing them. ``run`` times a suite, prints the table and its ratios, and writes
``bench_results/<suite>-<device>.json`` with the environment (device, torch, triton, date):
the README's performance table is copied from those files, never typed by hand.

Timing: on a GPU ``triton.testing.do_bench`` (median, L2 flushed between calls); on the CPU
the median of ``time.perf_counter`` over at least 5 calls and 1 s after 2 warm-up calls.

Suite ``model`` (this file) times the whole model:

* forward tokens/s of our two MLA paths and of transformers' ``DeepseekV3ForCausalLM`` (same
  config, random weights: speed only; skipped when transformers is not installed);
* one decode step (one new token per row) over a pre-filled cache, naive vs absorbed MLA: the
  whole model, and layer 0's attention alone with the bandwidth it reaches on its cache. The
  caches are filled with random values of the right shapes instead of a long prefill, which
  would dominate the run: attention costs the same whatever the values (only the routing of
  the few new tokens depends on them, a small effect).

CPU: the ``tiny`` preset in fp32 (forward 8 x 256; decode batch 8 at 512 and 2048 cached
tokens). GPU: the ``small`` preset in bf16 (forward 8 x 2048; decode batch 16 at 4096 and
16384 cached tokens: 11.25 GiB of naive cache at 16k, 1.69 GiB latent; all 12 layers fit).
Decode contexts beyond the preset's ``max_position_embeddings`` raise that limit (the rows say
so); RoPE positions are computed on the fly, so nothing else changes.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import inspect
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, preset
from .model import DeepSeekV3, KVCache

# suite name -> "module:function"; imported only when that suite runs.
# Two kinds: ``(device, quick) -> Suite`` (printed and saved here), and ``(quick) -> dict``
# for suites that print their own table and pick their own device (the kernel suites).
SUITES: dict[str, str] = {
    "model": "dsv3lite.bench:bench_model",
    "train": "dsv3lite.train.bench:bench_train",
    "fp8": "dsv3lite.fp8.bench:run",
    "comm": "dsv3lite.parallel.bench:run",
    "mla": "dsv3lite.inference_bench:run_mla",
    "moe": "dsv3lite.inference_bench:run_moe",
}


@dataclass
class Row:
    """One timed configuration. ``median_ms`` is None when the row was skipped (see note)."""

    name: str
    shape: str
    dtype: str
    median_ms: float | None
    tokens_per_s: float | None
    note: str = ""
    cache_bytes: int | None = None  # decode rows: the cache it reads (all layers, or attn's one)


@dataclass
class Ratio:
    """``value`` = time of ``baseline`` / time of ``candidate``: > 1 means the candidate is faster."""

    name: str
    candidate: str
    baseline: str
    value: float


@dataclass
class Suite:
    """What a suite function returns: its rows, then the ratios between them."""

    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}")

    def add_speedup(self, name: str, candidate: str, baseline: str) -> None:
        """Record baseline/candidate time, when both rows were measured."""
        c, b = self.row(candidate).median_ms, self.row(baseline).median_ms
        if c is not None and b is not None:
            self.ratios.append(Ratio(name, candidate, baseline, b / c))


# ---------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], Any], device: torch.device, quick: bool) -> float:
    """Median milliseconds per call of ``fn`` after warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (5, 20) if quick else (100, 500)  # milliseconds of running, not calls
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    # At least `reps` calls and `seconds` of them: short calls get many samples, as do_bench's.
    warmup, reps, seconds = (1, 3, 0.0) if quick else (2, 5, 1.0)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < reps or sum(times) < seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def environment(device: torch.device) -> dict[str, Any]:
    """What a reader needs to reproduce a figure: the device, the versions, the date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- suite: model
@dataclass(frozen=True)
class ModelPlan:
    """Shapes of the ``model`` suite on one kind of device."""

    preset: str
    dtype: torch.dtype
    forward: tuple[int, int]  # batch, sequence length
    decode_batch: int
    decode_contexts: tuple[int, ...]  # tokens already cached


CPU_PLAN = ModelPlan("tiny", torch.float32, (8, 256), 8, (512, 2048))
GPU_PLAN = ModelPlan("small", torch.bfloat16, (8, 2048), 16, (4096, 16384))


def _quick(plan: ModelPlan) -> ModelPlan:
    """Seconds, not minutes: for tests and smoke runs; the JSON records quick=true."""
    return dataclasses.replace(plan, forward=(2, 64), decode_batch=2, decode_contexts=(256,))


@torch.inference_mode()
def bench_model(device: torch.device, quick: bool) -> Suite:
    """Forward tokens/s (ours naive, ours absorbed, transformers) and decode naive vs absorbed."""
    plan = CPU_PLAN if device.type == "cpu" else GPU_PLAN
    if quick:
        plan = _quick(plan)
    dtype = _dtype_name(plan.dtype)
    config = preset(plan.preset)
    # Only the decode rows need the raised position limit; the forward never reaches it.
    longest = max(plan.decode_contexts) + 1
    raised = ""
    if longest > config.max_position_embeddings:
        raised = f"max_position_embeddings raised to {longest}"
        config = config.replace(max_position_embeddings=longest)
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no host-side copy of the weights
        model = DeepSeekV3(config).to(plan.dtype).eval()
    suite = Suite()

    b, t = plan.forward
    ids = torch.randint(0, config.vocab_size, (b, t), device=device)
    shape = f"{plan.preset} {b}x{t}"
    for impl in ("naive", "absorb"):
        model.attn_impl = impl
        ms = median_ms(lambda: model(ids), device, quick)
        suite.rows.append(Row(f"forward ours {impl}", shape, dtype, ms, b * t / ms * 1e3))
    suite.rows.append(_forward_transformers(config, ids, plan.dtype, device, quick, shape))
    suite.add_speedup("forward: absorb vs naive", "forward ours absorb", "forward ours naive")
    suite.add_speedup(
        "forward: ours naive vs transformers", "forward ours naive", "forward transformers"
    )

    for ctx in plan.decode_contexts:
        for impl in ("naive", "absorb"):
            suite.rows.extend(_decode_rows(model, impl, plan, ctx, device, quick, raised))
        for what in ("decode", "decode attn"):
            suite.add_speedup(
                f"{what} @{ctx}: absorb vs naive", f"{what} absorb @{ctx}", f"{what} naive @{ctx}"
            )
    return suite


def _decode_rows(
    model: DeepSeekV3,
    impl: str,
    plan: ModelPlan,
    ctx: int,
    device: torch.device,
    quick: bool,
    note: str,
) -> list[Row]:
    """One decode step of ``plan.decode_batch`` rows after ``ctx`` cached tokens: the whole
    model, then layer 0's MLA alone over the same cache.

    The second row isolates what the attention path changes. In the whole step, the expert
    loop's many small GEMMs can cost more than attention (launch-bound on a GPU), which hides
    the difference between the paths."""
    model.attn_impl = impl
    b = plan.decode_batch
    cache = prefilled_cache(model, b, ctx, plan.dtype, device)
    ids = torch.randint(0, model.config.vocab_size, (b, 1), device=device)
    # Every call decodes position ctx again: the model advances seq_len, so reset it first.

    def step() -> torch.Tensor:
        cache.seq_len = ctx
        return model(ids, cache=cache).logits

    attn = model.model.layers[0].self_attn
    x = torch.randn(b, 1, model.config.hidden_size, dtype=plan.dtype, device=device)
    cos, sin = model.model.rotary_emb(torch.tensor([ctx], device=device))

    def attend() -> torch.Tensor:
        cache.seq_len = ctx
        return attn(x, cos, sin, None, cache, impl)

    nbytes = cache.nbytes()
    layer_bytes = nbytes // model.config.num_hidden_layers
    dtype, shape = _dtype_name(plan.dtype), f"{plan.preset} batch {b}, 1 new token"
    ms = median_ms(step, device, quick)
    cache_note = f"cache {nbytes / 2**20:,.1f} MiB, {model.config.num_hidden_layers} layers"
    step_note = "; ".join(n for n in (cache_note, note) if n)
    step_row = Row(f"decode {impl} @{ctx}", shape, dtype, ms, b / ms * 1e3, step_note, nbytes)
    ms = median_ms(attend, device, quick)
    gbs = layer_bytes / ms / 1e6
    attn_row = Row(
        f"decode attn {impl} @{ctx}",
        shape,
        dtype,
        ms,
        None,
        f"one MLA layer; its cache {layer_bytes / 2**20:,.1f} MiB read at {gbs:,.1f} GB/s",
        layer_bytes,
    )
    return [step_row, attn_row]


def prefilled_cache(
    model: DeepSeekV3, batch: int, ctx: int, dtype: torch.dtype, device: torch.device
) -> KVCache:
    """A cache for ``model.attn_impl`` holding ``ctx`` tokens of random values, one slot free.

    The shapes are what MLA writes: naive keeps K [B, T, H, d_h + d_h^R] and V [B, T, H, d_v];
    absorb keeps c^KV [B, T, kv_lora_rank] and k^R [B, T, d_h^R].
    """
    c = model.config
    h = c.num_attention_heads
    if model.attn_impl == "naive":
        shapes = [(h, c.qk_head_dim), (h, c.v_head_dim)]
    else:
        shapes = [(c.kv_lora_rank,), (c.qk_rope_head_dim,)]
    cache = model.new_cache(batch, ctx + 1)
    for layer in model.model.layers:
        new = [torch.randn(batch, ctx, *s, dtype=dtype, device=device) for s in shapes]
        cache.update(layer.layer_idx, *new)
    cache.seq_len = ctx
    return cache


def _forward_transformers(
    config: ModelConfig,
    ids: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    shape: str,
) -> Row:
    """transformers' DeepseekV3ForCausalLM on the same config (its default attention and experts)."""
    name, dtype_name = "forward transformers", _dtype_name(dtype)
    try:
        import transformers
    except ImportError:
        return Row(name, shape, dtype_name, None, None, "skipped: transformers not installed")
    hf_config = transformers.DeepseekV3Config(**config.to_dict())
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no host-side copy of the weights
        hf = transformers.DeepseekV3ForCausalLM(hf_config).to(dtype).eval()
    ms = median_ms(lambda: hf(input_ids=ids, use_cache=False).logits, device, quick)
    b, t = ids.shape
    note = f"transformers {transformers.__version__}, attn {hf.config._attn_implementation}"
    return Row(name, shape, dtype_name, ms, b * t / ms * 1e3, note)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- running
def resolve_device(name: str) -> torch.device:
    """'auto': cuda when present, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def default_out(suite: str, device: torch.device) -> Path:
    """bench_results/<suite>-<device>.json, the device as a slug ('cpu', 'nvidia-h200')."""
    slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-")
    return Path("bench_results") / f"{suite}-{slug}.json"


def run(
    suite: str,
    *,
    device: str | torch.device = "auto",
    out: str | os.PathLike | None = None,
    quick: bool = False,
) -> Path:
    """Run one suite, print its table, write its JSON; returns the JSON path."""
    if suite not in SUITES:
        raise ValueError(f"unknown bench suite {suite!r}; allowed: {sorted(SUITES)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    module, func = SUITES[suite].split(":")
    fn = getattr(importlib.import_module(module), func)
    if "device" in inspect.signature(fn).parameters:
        result: Suite = fn(dev, quick)
        env = environment(dev)
        print(format_table(suite, env, result))
        record = {
            "suite": suite,
            "quick": quick,
            "env": env,
            "rows": [dataclasses.asdict(r) for r in result.rows],
            "ratios": [dataclasses.asdict(r) for r in result.ratios],
        }
    else:
        record = {"suite": suite, "quick": quick, **fn(quick=quick)}
    path = Path(out) if out is not None else default_out(suite, dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def format_table(suite: str, env: dict[str, Any], result: Suite) -> str:
    """A plain-text table of the rows, then the ratios."""
    lines = [
        f"bench {suite} on {env['device']}: torch {env['torch']}, triton {env['triton']}, {env['date']}",
        "",
        f"{'what':<28}{'shape':<32}{'dtype':<10}{'median ms':>11}{'tokens/s':>13}  note",
    ]
    for r in result.rows:
        ms = f"{r.median_ms:.3f}" if r.median_ms is not None else "-"
        tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "-"
        lines.append(f"{r.name:<28}{r.shape:<32}{r.dtype:<10}{ms:>11}{tps:>13}  {r.note}")
    if result.ratios:
        lines.append("")
        lines.extend(f"{r.name:<40}{r.value:>8.2f}x" for r in result.ratios)
    return "\n".join(lines)
