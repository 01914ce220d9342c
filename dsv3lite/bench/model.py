"""``bench model``: the whole model, forward and decode.


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
from dataclasses import dataclass

import torch

from ..config import ModelConfig, preset
from ..model import DeepSeekV3, KVCache
from .harness import Results, Row, median_ms


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
def run(device: torch.device, quick: bool) -> Results:
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
    suite = Results()

    b, t = plan.forward
    ids = torch.randint(0, config.vocab_size, (b, t), device=device)
    shape = f"{plan.preset} {b}x{t}"
    for impl in ("naive", "absorb"):
        model.attn_impl = impl
        ms = median_ms(lambda: model(ids), device, quick)
        suite.rows.append(_row(f"forward ours {impl}", shape, dtype, ms, b * t))
    suite.rows.append(_forward_transformers(config, ids, plan.dtype, device, quick, shape))
    suite.ratio("forward: absorb vs naive", "forward ours absorb", "forward ours naive")
    suite.ratio("forward: ours naive vs transformers", "forward ours naive", "forward transformers")

    for ctx in plan.decode_contexts:
        for impl in ("naive", "absorb"):
            suite.rows.extend(_decode_rows(model, impl, plan, ctx, device, quick, raised))
        for what in ("decode", "decode attn"):
            suite.ratio(
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
    step_row = _row(f"decode {impl} @{ctx}", shape, dtype, ms, b, step_note, cache_bytes=nbytes)
    ms = median_ms(attend, device, quick)
    gbs = layer_bytes / ms / 1e6
    attn_row = Row(
        f"decode attn {impl} @{ctx}",
        shape,
        ms,
        gbs,
        "GB/s",
        f"one MLA layer; its cache {layer_bytes / 2**20:,.1f} MiB read at {gbs:,.1f} GB/s",
        {"dtype": dtype, "cache_bytes": layer_bytes},
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
        return _row(name, shape, dtype_name, None, 0, "skipped: transformers not installed")
    hf_config = transformers.DeepseekV3Config(**config.to_dict())
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no host-side copy of the weights
        hf = transformers.DeepseekV3ForCausalLM(hf_config).to(dtype).eval()
    ms = median_ms(lambda: hf(input_ids=ids, use_cache=False).logits, device, quick)
    b, t = ids.shape
    note = f"transformers {transformers.__version__}, attn {hf.config._attn_implementation}"
    return _row(name, shape, dtype_name, ms, b * t, note)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row(
    name: str,
    shape: str,
    dtype: str,
    ms: float | None,
    tokens: int,
    note: str = "",
    cache_bytes: int | None = None,
) -> Row:
    """A row whose figure is tokens/s: ``tokens`` processed per call of ``ms``."""
    tokens_per_s = tokens / ms * 1e3 if ms else None
    extra = {"dtype": dtype, "cache_bytes": cache_bytes}
    return Row(name, shape, ms, tokens_per_s, "tokens/s", note, extra)
