"""Parameter and KV-cache accounting from a config alone (no weights are allocated).

The numbers for the release's shapes reproduce the report: 671B total parameters (MTP
excluded; 685B on disk with the MTP layer and its copies of embedding and head), of which
about 37B are activated per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

# What a token touches: every part except the routed experts it is not sent to, and except the
# embedding table, whose "use" is reading one row, not multiplying by the matrix. The release's
# README_WEIGHTS.md first said 36.7B "including 0.9B for Embedding and 0.9B for the output Head",
# later 36.6B "including 0.9B for the output Head": we count as the later text does (36.63B).
PARTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "gate",
    "norms",
    "head",
)


def _attention(c: ModelConfig) -> int:
    h, qk = c.num_attention_heads, c.qk_head_dim
    if c.q_lora_rank:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk
    else:
        q = c.hidden_size * h * qk
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + h * c.v_head_dim * c.hidden_size


def _layer(c: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Parameters of one decoder layer, by part (both the total and what one token uses)."""
    mlp = 3 * c.hidden_size
    parts = dict.fromkeys(PARTS, 0)
    parts["attention"] = _attention(c)
    parts["norms"] = 2 * c.hidden_size
    if c.is_moe_layer(layer_idx):
        parts["routed_experts"] = c.n_routed_experts * mlp * c.moe_intermediate_size
        parts["shared_experts"] = c.n_shared_experts * mlp * c.moe_intermediate_size
        parts["gate"] = c.n_routed_experts * c.hidden_size + c.n_routed_experts
    else:
        parts["dense_mlp"] = mlp * c.intermediate_size
    return parts


@dataclass
class ParamCount:
    """Total and activated parameters, by part; ``mtp`` is reported apart, as the report does."""

    total: dict[str, int]
    activated: dict[str, int]
    mtp_total: int
    mtp_activated: int

    @property
    def total_sum(self) -> int:
        return sum(self.total.values())

    @property
    def activated_sum(self) -> int:
        return sum(self.activated.values())


def count_parameters(c: ModelConfig) -> ParamCount:
    """Count parameters of the main model (and the MTP modules separately) from the config."""
    total = dict.fromkeys(PARTS, 0)
    activated = dict.fromkeys(PARTS, 0)
    for i in range(c.num_hidden_layers):
        for part, n in _layer(c, i).items():
            total[part] += n
            activated[part] += n
        if c.is_moe_layer(i):
            activated["routed_experts"] -= (
                (c.n_routed_experts - c.num_experts_per_tok)
                * 3
                * c.hidden_size
                * c.moe_intermediate_size
            )
    emb = c.vocab_size * c.hidden_size
    total["embedding"] = emb
    total["head"] = 0 if c.tie_word_embeddings else emb
    activated["head"] = emb
    total["norms"] += c.hidden_size
    activated["norms"] += c.hidden_size
    # one MTP module: a MoE block + enorm, hnorm, eh_proj, its head norm (embedding/head shared)
    mtp_layer = _layer(c, max(c.num_hidden_layers, c.first_k_dense_replace))
    extra = 3 * c.hidden_size + 2 * c.hidden_size * c.hidden_size
    mtp_total = sum(mtp_layer.values()) + extra
    mtp_act = mtp_total - (
        (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
    )
    d = c.num_nextn_predict_layers
    return ParamCount(total, activated, d * mtp_total, d * mtp_act)


@dataclass
class CacheBytes:
    """KV-cache bytes per token per layer for three attention designs with the same heads."""

    mha: int  # full keys (d_h + d_h^R) and values (d_v) of every head
    gqa8: int  # GQA with 8 key/value groups (one per head if fewer heads), for comparison
    mla: int  # the latent c^KV plus the shared RoPE key k^R


def kv_cache_bytes(c: ModelConfig, bytes_per_value: int = 2) -> CacheBytes:
    """Per token per layer, at ``bytes_per_value`` (2 for bf16)."""
    per_head = c.qk_head_dim + c.v_head_dim
    return CacheBytes(
        mha=c.num_attention_heads * per_head * bytes_per_value,
        gqa8=min(8, c.num_attention_heads) * per_head * bytes_per_value,
        mla=(c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value,
    )


def format_count(n: float) -> str:
    """12_345_678 → '12.35M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def parameter_table(c: ModelConfig) -> str:
    """A text table: part, total, activated per token."""
    pc = count_parameters(c)
    rows = [f"{'part':<16}{'total':>12}{'activated':>12}"]
    for part in PARTS:
        rows.append(
            f"{part:<16}{format_count(pc.total[part]):>12}{format_count(pc.activated[part]):>12}"
        )
    rows.append(f"{'sum':<16}{format_count(pc.total_sum):>12}{format_count(pc.activated_sum):>12}")
    rows.append(
        f"{'MTP (apart)':<16}{format_count(pc.mtp_total):>12}{format_count(pc.mtp_activated):>12}"
    )
    return "\n".join(rows)


def absorbed_decode_cost(
    kv_lora_rank: int,
    rope_dim: int,
    heads: int,
    context: int,
    batch: int = 1,
    tokens: int = 1,
    bytes_per_value: int = 2,
) -> tuple[int, int]:
    """(bytes read, FLOPs) of one layer's absorbed MLA decode step over ``context`` cached
    tokens. The cache — latent c^KV (d_c values) and RoPE key k^R (d_h^R values) per token — is
    read once for all heads (and all ``tokens`` query positions, T = 2 when verifying an MTP
    draft); each head and query position does, per cached token, 2·(d_c + d_h^R) FLOPs for its
    score and 2·d_c for the latent average. Their ratio, the arithmetic intensity, grows with
    heads × tokens and does not depend on batch or context: 16 heads sit far below a GPU's
    ridge (memory-bound), 128 near it."""
    nbytes = batch * context * (kv_lora_rank + rope_dim) * bytes_per_value
    flops = 2 * batch * context * heads * tokens * (2 * kv_lora_rank + rope_dim)
    return nbytes, flops


@dataclass(frozen=True)
class Roofline:
    """A machine's two ceilings, FLOP/s and bytes/s. A kernel of arithmetic intensity I
    FLOP/byte attains at most min(flops, I · bytes_per_s); the ridge flops / bytes_per_s
    separates the memory-bound side (below it) from the compute-bound one."""

    flops: float
    bytes_per_s: float
    name: str = "GPU"

    @property
    def ridge(self) -> float:
        return self.flops / self.bytes_per_s

    def attainable(self, intensity: float) -> float:
        return min(self.flops, intensity * self.bytes_per_s)

    def seconds(self, nbytes: float, flops: float) -> float:
        """The roofline's lower bound on a kernel's time: max(bytes / bandwidth, FLOPs / rate)."""
        return max(nbytes / self.bytes_per_s, flops / self.flops)

    @classmethod
    def from_results(cls, results: dict) -> Roofline:
        """The ceilings a recorded benchmark run measured (``dsv3lite.results.load(...)``): its
        best bf16 GEMM and its device-to-device copy, on that machine."""
        ceil = results["ceilings"]
        return cls(ceil["gemm_tflops"] * 1e12, ceil["copy_gbs"] * 1e9, results["env"]["device"])
