"""``python -m dsv3lite demo``: DeepSeek-V3 in one page of plain text, checking itself as it goes.

1. the ``tiny`` preset beside the release's shapes;
2. total vs activated parameters, by part, beside the report's and the release notes' figures;
3. KV-cache bytes of MHA, GQA-8 and MLA at the release's shapes, and what 128k tokens cost;
4. a tiny random model: a forward pass, naive vs absorbed MLA, greedy decoding from the latent cache;
5. that model trained on CPython's embedded documentation (a few minutes on a 2-core CPU), its
   validation loss against the corpus's unigram entropy, the plots, and a sample.

Every figure is computed here; the published ones are printed beside ours, never instead of
them. The checks raise AssertionError, so a wrong count stops the demo (and ``make demo``).
Sections 1-4 take seconds; section 5 trains for ``DEMO_STEPS`` steps (``--steps`` to change).
"""

from __future__ import annotations

import datetime
import textwrap
import time
from pathlib import Path

import torch

from .accounting import count_parameters, format_count, kv_cache_bytes, parameter_table
from .config import ModelConfig, preset
from .generate import greedy
from .model import DeepSeekV3

# The published figures (arXiv 2412.19437 abstract; the release's README_WEIGHTS.md).
REPORT_TOTAL = 671e9  # MTP excluded
REPORT_ACTIVATED = 37e9
RELEASE_ACTIVATED = 36.7e9
RELEASE_MTP = 11.5e9  # the MTP module's own parameters (embedding and head are shared)
CONTEXT = 128 * 1024
DEMO_STEPS = 400  # 16 x 128 tokens a step: 2.1 minutes on an idle 2-core CPU (measured)
SAMPLE_PROMPT = "The with statement"

SUMMARY_FIELDS = (
    "num_hidden_layers",
    "first_k_dense_replace",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "scoring_func",
    "num_nextn_predict_layers",
    "max_position_embeddings",
)


def run(steps: int = DEMO_STEPS, out: str | None = None) -> None:
    """Print the five sections; raise AssertionError if a figure is off."""
    tiny, full = preset("tiny"), preset("v3-671b")
    _config_section(tiny, full)
    _parameter_section(tiny, full)
    _kv_cache_section(full)
    _model_section(tiny)
    if steps:
        _train_section(steps, out)


def _heading(text: str) -> None:
    print(f"\n== {text} ==\n")


def _say(text: str) -> None:
    print(textwrap.fill(text, width=100, subsequent_indent="  "))


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def _pct(ours: float, theirs: float) -> str:
    return f"{100 * (ours - theirs) / theirs:+.2f}%"


def _config_section(tiny: ModelConfig, full: ModelConfig) -> None:
    _heading("1. Config: the tiny preset beside DeepSeek-V3 (HF config.json names)")
    print(f"{'field':<28}{'tiny':>12}{'v3-671b':>12}")
    for name in SUMMARY_FIELDS:
        print(f"{name:<28}{getattr(tiny, name)!s:>12}{getattr(full, name)!s:>12}")
    print()
    _say(
        "Every layer is MLA attention + an FFN; the FFN is dense for the first "
        "first_k_dense_replace layers and DeepSeekMoE after them (a shared expert plus the "
        "top num_experts_per_tok of n_routed_experts, chosen inside the best topk_group of n_group "
        "groups). num_nextn_predict_layers MTP modules sit on top."
    )


def _parameter_section(tiny: ModelConfig, full: ModelConfig) -> None:
    _heading("2. Parameters: total vs activated per token")
    print("tiny:")
    print(parameter_table(tiny))
    pc = count_parameters(tiny)
    model = DeepSeekV3(tiny)
    n_model = model.num_parameters()
    # The gate bias is a buffer (the balancing rule updates it, not gradients) but a checkpoint
    # tensor, so the count includes it.
    n_bias = sum(m.gate.e_score_correction_bias.numel() for m in model.moe_layers())
    _expect(
        n_model + n_bias == pc.total_sum + pc.mtp_total,
        "instantiated tiny model disagrees with the accounting",
    )
    print(
        f"instantiated tiny model: {n_model:,} parameters + {n_bias} gate-bias values = "
        f"{pc.total_sum:,} main + {pc.mtp_total:,} MTP, as counted"
    )

    print("\nv3-671b (counted from the config; never instantiated):")
    print(parameter_table(full))
    pc = count_parameters(full)
    total, act = pc.total_sum, pc.activated_sum
    print(
        f"\ntotal (MTP excluded): {total:,} = {format_count(total)}   "
        f"report: 671B ({_pct(total, REPORT_TOTAL)})"
    )
    _expect(abs(total - REPORT_TOTAL) <= 0.01 * REPORT_TOTAL, "total is not within 1% of 671B")
    print(
        f"activated per token: {act:,} = {format_count(act)}   "
        f"release notes: 36.7B ({_pct(act, RELEASE_ACTIVATED)}), "
        f"report: 37B ({_pct(act, REPORT_ACTIVATED)})"
    )
    _expect(
        abs(act - RELEASE_ACTIVATED) <= 0.01 * RELEASE_ACTIVATED,
        "activated count is not within 1% of 36.7B",
    )
    emb = pc.total["embedding"]
    _say(
        f"  counted: everything a token touches - attention, the dense MLPs, the shared expert and "
        f"{full.num_experts_per_tok} of {full.n_routed_experts} routed experts in each MoE layer, "
        "the gates, the norms and the output head. The embedding is a row lookup, not counted; "
        f"with its {format_count(emb)} the count would be {format_count(act + emb)} (the release "
        "notes word their 36.7B as including it, yet their total matches ours without it)."
    )
    print(
        f"MTP module (apart): {pc.mtp_total:,} = {format_count(pc.mtp_total)}   "
        f"release notes: 11.5B unique ({_pct(pc.mtp_total, RELEASE_MTP)}); "
        "its embedding and head are the main model's"
    )


def _kv_cache_section(full: ModelConfig) -> None:
    _heading("3. KV cache per token per layer at v3-671b shapes (bf16)")
    kv = kv_cache_bytes(full, 2)
    h, qk, v = full.num_attention_heads, full.qk_head_dim, full.v_head_dim
    layers = full.num_hidden_layers
    rows = (
        ("MHA-equivalent", f"{h} heads x ({qk} key + {v} value)", kv.mha),
        ("GQA-8", f"8 groups x ({qk} key + {v} value)", kv.gqa8),
        ("MLA", f"c^KV {full.kv_lora_rank} + k^R {full.qk_rope_head_dim}", kv.mla),
    )
    print(
        f"{'design':<16}{'what is cached':<34}{'bytes':>8}{f'GiB at {CONTEXT:,} tokens x {layers} layers':>36}"
    )
    for name, what, nbytes in rows:
        gib = nbytes * layers * CONTEXT / 2**30
        print(f"{name:<16}{what:<34}{nbytes:>8,}{gib:>36.1f}")
    # Absorbed decode, per cached token and query head: a (d_c + d_h^R)-wide score and a
    # d_c-wide value accumulation, 2 FLOPs per multiply-add.
    flops = 2 * (full.kv_lora_rank + full.qk_rope_head_dim) + 2 * full.kv_lora_rank
    print()
    _say(
        f"MLA caches {kv.mha / kv.mla:.1f}x fewer bytes than MHA and {kv.gqa8 / kv.mla:.1f}x "
        "fewer than GQA-8. The price is arithmetic: the absorbed path attends in the latent, "
        f"{flops:,} FLOPs per cached token per head, so {h} heads do "
        f"{flops * h / kv.mla:.0f} FLOPs per cached byte read - more than an H200's bf16 peak "
        "per byte of memory bandwidth, so decoding at 128 heads is bound by compute, not memory."
    )


def _model_section(tiny: ModelConfig) -> None:
    _heading("4. A tiny random model (seed 0)")
    torch.manual_seed(0)
    model = DeepSeekV3(tiny).eval()
    ids = torch.randint(0, tiny.vocab_size, (2, 64))
    with torch.no_grad():
        model(ids)  # warm-up: the first call pays for one-off allocations
        start = time.perf_counter()
        naive = model(ids).logits
        ms = 1e3 * (time.perf_counter() - start)
        model.attn_impl = "absorb"
        absorbed = model(ids).logits
    print(
        f"forward: input_ids {list(ids.shape)} -> logits {list(naive.shape)} in {ms:.1f} ms (naive MLA)"
    )
    diff = (naive - absorbed).abs().max().item()
    print(f"naive vs absorbed logits: max abs diff {diff:.2e}")
    _expect(diff < 1e-4, "naive and absorbed MLA disagree")

    prompt = ids[:, :8]
    out = greedy(model, prompt, 8, attn_impl="absorb")
    for row in range(out.shape[0]):
        print(f"greedy row {row}: prompt {prompt[row].tolist()} -> new {out[row, 8:].tolist()}")
    same = torch.equal(out, greedy(model, prompt, 8, attn_impl="naive"))
    print(f"the naive path decodes the same tokens: {'yes' if same else 'NO'}")
    _expect(same, "greedy decoding differs between the naive and absorbed paths")

    per_token = kv_cache_bytes(tiny, bytes_per_value=4)  # the tiny model runs in fp32
    tokens = prompt.numel() * tiny.num_hidden_layers
    for impl, expected in (("naive", per_token.mha), ("absorb", per_token.mla)):
        model.attn_impl = impl
        cache = model.new_cache(*prompt.shape)
        with torch.no_grad():
            model(prompt, cache=cache)
        _expect(cache.nbytes() == expected * tokens, f"{impl} cache size disagrees with accounting")
        print(
            f"{impl:<6} cache after the prompt: {cache.nbytes():>7,} bytes "
            f"({expected} bytes per token per layer, fp32)"
        )


def _train_section(steps: int, out: str | None) -> None:
    from .checkpoint import load_pretrained
    from .train import TrainConfig, load_tokenizer, train

    _heading(f"5. Training tiny on CPython's own documentation ({steps} steps)")
    out = out or f"runs/demo-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    _say(
        "Next-token loss plus the MTP loss (λ = 0.3, eq. 25), auxiliary-loss-free balancing "
        "(γ = 0.001), AdamW with warm-up and cosine decay; checkpoints every 100 steps in the "
        f"release's format under {out}/last (resumable with --resume)."
    )
    start = time.perf_counter()
    result = train(TrainConfig(steps=steps, out=out))
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nvalidation loss {result.val_loss:.3f} nats/token vs the corpus's unigram entropy "
        f"{result.unigram_entropy:.3f} ({minutes:.1f} min)"
    )
    if steps >= DEMO_STEPS:
        _expect(
            result.val_loss < result.unigram_entropy - 1.0,
            "the trained model is not clearly better than counting tokens",
        )
    print(f"plots: {', '.join(str(p) for p in result.plots)}")
    print(f"checkpoint (config.json + safetensors + tokenizer.json): {result.final}")
    model = load_pretrained(result.final)
    tok = load_tokenizer(result.final, model.config.vocab_size)
    prompt = torch.tensor([tok.encode(SAMPLE_PROMPT).ids])
    sample = greedy(model, prompt, 48)
    print(f"\ngreedy sample:\n{tok.decode(sample[0].tolist())}")
    Path(out, "sample.txt").write_text(tok.decode(sample[0].tolist()) + "\n")
