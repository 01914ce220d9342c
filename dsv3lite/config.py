"""ModelConfig: the hyper-parameters of a DeepSeek-V3-style model, with Hugging Face field names.

The field names are those of transformers' ``DeepseekV3Config`` (and of the release's
``config.json``), so a config reads and writes without a translation table. Three presets:

* ``tiny``    — trains in minutes on a 2-core CPU (the course's workhorse);
* ``small``   — 100M+ parameters, for one GPU;
* ``v3-671b`` — the release's shapes, for accounting only (never instantiate it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError, UserTypeError, check_bool, check_int, check_number

_YARN_KEYS = (
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "max_position_embeddings",
)
# config.json keys that transformers or the release write and that set nothing here: generic
# bookkeeping, inference switches, the release's deployment and FP8 settings, training-only
# values. Other unknown keys are probably misspelt or foreign names: from_dict warns.
_IGNORED_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "auto_map",
    "torch_dtype", "dtype", "quantization_config", "use_cache", "pretraining_tp", "pad_token_id",
    "attention_dropout", "attention_bias", "num_key_value_heads", "moe_layer_freq", "topk_method",
    "ep_size", "seq_aux", "aux_loss_alpha", "output_router_logits", "id2label", "label2id",
    "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions", "output_hidden_states",
    "problem_type", "return_dict",
})  # fmt: skip
# keys with a single value this model implements: anything else would be silently wrong
_FIXED_KEYS = {
    "moe_layer_freq": (1, "every layer from first_k_dense_replace on is MoE"),
    "attention_bias": (False, "the attention projections have no bias"),
}


@dataclass
class ModelConfig:
    """Hyper-parameters of the model; see the report §2 and Table 1 of arXiv 2412.19437."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (the first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # d_c' in eq. (6); None or 0: no query compression
    kv_lora_rank: int = 512  # d_c in eq. (1)
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R
    v_head_dim: int = 128
    n_routed_experts: int = 256  # N_r
    n_shared_experts: int = 1  # N_s
    num_experts_per_tok: int = 8  # K_r
    n_group: int = 8  # expert groups (one per node in the report's deployment)
    topk_group: int = 4  # groups a token may reach (node-limited routing, M = 4)
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    scoring_func: str = "sigmoid"  # "softmax" for DeepSeek-V2-style gates
    # how a group is scored for group-limited routing: the sum of its two best biased scores
    # (the release, transformers) or its best score ("max": DeepSeek's inference code when the
    # gate has no bias, i.e. every config but the 671B one)
    group_score: str = "top2_sum"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor": ..., ...} or None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1  # MTP depth D (§2.2)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # other keys

    def __post_init__(self) -> None:
        if type(self.q_lora_rank) is int and self.q_lora_rank == 0:  # not False, not 0.0
            self.q_lora_rank = None
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise UserTypeError(
                    "ModelConfig.rope_scaling must be a dict ({'type': 'yarn', 'factor': ..., "
                    f"'original_max_position_embeddings': ...}}) or None, got {self.rope_scaling!r}"
                )
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: the no-position part plus the decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale² under YaRN (as transformers and the release do)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers before first_k_dense_replace use a dense FFN; the rest DeepSeekMoE."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise UserInputError (a ValueError; UserTypeError, also a TypeError, for a value of the
        wrong type) naming the field and the allowed values when the config is unusable."""
        for name in _POSITIVE_INTS:
            check_int(f"ModelConfig.{name}", getattr(self, name), 1)
        for name in ("n_routed_experts", "n_shared_experts", "num_nextn_predict_layers"):
            check_int(f"ModelConfig.{name}", getattr(self, name), 0)
        if self.q_lora_rank is not None:
            check_int(
                "ModelConfig.q_lora_rank (None or 0: no query compression)", self.q_lora_rank, 1
            )
        # more dense layers than layers would silently build a dense model
        check_int(
            "ModelConfig.first_k_dense_replace (dense layers, at most num_hidden_layers)",
            self.first_k_dense_replace,
            0,
            self.num_hidden_layers,
        )
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "initializer_range"):
            check_number(f"ModelConfig.{name}", getattr(self, name))
        for name in ("norm_topk_prob", "rope_interleave", "tie_word_embeddings"):
            check_bool(f"ModelConfig.{name}", getattr(self, name))
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) is not None:
                check_int(f"ModelConfig.{name}", getattr(self, name), 0, self.vocab_size - 1)
        if self.extra.get("pad_token_id") is not None:
            check_int("config.pad_token_id", self.extra["pad_token_id"], 0, self.vocab_size - 1)
        if self.qk_rope_head_dim % 2:
            raise UserInputError(
                f"ModelConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}"
            )
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise UserInputError(
                f"ModelConfig.scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}"
            )
        if self.group_score not in ("top2_sum", "max"):
            raise UserInputError(
                f"ModelConfig.group_score must be 'top2_sum' or 'max', got {self.group_score!r}"
            )
        if self.hidden_act != "silu":
            raise UserInputError(f"ModelConfig.hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.n_routed_experts > 0:
            self._validate_routing()

    def _validate_routing(self) -> None:
        for name in ("n_group", "topk_group", "num_experts_per_tok"):
            check_int(f"ModelConfig.{name}", getattr(self, name), 1)
        if self.n_routed_experts % self.n_group:
            raise UserInputError(
                f"ModelConfig.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                f"n_group ({self.n_group}); allowed n_group values: "
                f"{[g for g in range(1, self.n_routed_experts + 1) if self.n_routed_experts % g == 0]}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise UserInputError(
                f"ModelConfig.topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}"
            )
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2 and self.group_score == "top2_sum":
            raise UserInputError(
                f"ModelConfig.n_group={self.n_group} leaves {per_group} expert per group; group "
                "scores sum each group's top-2 experts, so every group needs at least 2 "
                f"(n_group <= {self.n_routed_experts // 2})"
            )
        reachable = self.topk_group * per_group
        if not 1 <= self.num_experts_per_tok <= reachable:
            raise UserInputError(
                f"ModelConfig.num_experts_per_tok must be in [1, {reachable}] (topk_group × "
                f"experts per group = {self.topk_group} × {per_group}), got {self.num_experts_per_tok}"
            )

    # ------------------------------------------------------------------ config.json I/O
    def to_dict(self) -> dict[str, Any]:
        """The config.json content, in the release's spelling (rope_theta + rope_scaling)."""
        d = dict(self.extra)
        d.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        )
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads
        d["topk_method"] = "noaux_tc"
        d["attention_bias"] = False
        d.setdefault("torch_dtype", "float32")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict in either spelling (release or transformers 5).

        Keys that are no field and not in ``_IGNORED_KEYS`` are kept (they round-trip) but
        warned about: a misspelt or foreign name (DeepSeek's inference ``dim``, ``n_layers``)
        would otherwise leave that field at its 671B default without a word."""
        if not isinstance(d, dict):
            raise UserTypeError(
                f"a config must be a JSON object of fields, got {type(d).__name__} {d!r:.60}"
            )
        d = dict(d)
        for derived in ("head_dim", "qk_head_dim"):  # transformers writes these; we derive them
            d.pop(derived, None)
        if "dtype" in d:  # transformers 5 spells torch_dtype as dtype
            dtype = d.pop("dtype")
            d.setdefault("torch_dtype", dtype)
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise UserTypeError(f"config.rope_parameters must be a dict, got {rope_parameters!r}")
        if rope_parameters:
            d.setdefault("rope_theta", rope_parameters.get("rope_theta", 10000.0))
            rtype = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
            if rtype not in ("default", None) and not d.get("rope_scaling"):
                d["rope_scaling"] = rope_parameters
        kv_heads = d.get("num_key_value_heads")
        if kv_heads is not None and kv_heads != d.get("num_attention_heads", kv_heads):
            raise UserInputError(
                f"config.num_key_value_heads ({kv_heads}) must equal num_attention_heads: MLA "
                "expands every head's key and value from the shared latent"
            )
        for key, (needed, why) in _FIXED_KEYS.items():
            if d.get(key, needed) != needed:
                raise UserInputError(f"config.{key} must be {needed!r} ({why}), got {d[key]!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        unknown = sorted(set(extra) - _IGNORED_KEYS)
        if unknown:
            warnings.warn(
                f"config: unknown fields {unknown} are ignored (fields take transformers' "
                "DeepseekV3Config names); any field not given keeps its DeepSeek-V3 default",
                stacklevel=2,
            )
        if known.get("rope_scaling") is not None and not isinstance(known["rope_scaling"], dict):
            raise UserInputError(
                f"config.rope_scaling must be a dict or null, got {known['rope_scaling']!r}"
            )
        return cls(**known, extra=extra)

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        target = path / "config.json" if path.is_dir() else path
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read config.json (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_bytes().decode("utf-8-sig"))
            return cls.from_dict(d)
        except UnicodeDecodeError as err:
            raise UserInputError(
                f"{path} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path} is not valid JSON: {err}") from None
        except UserInputError as err:  # the same error, naming the file
            raise type(err)(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(factor) + 1 (1 when factor <= 1)."""
    import math

    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any] | None:
    """Accept the release's {"type": "yarn", ...}, transformers' {"rope_type": "yarn", ...} and
    transformers 5's rope_parameters, which hold both (then they must agree); check the values."""
    rs = dict(rs)
    rope_type, old_type = rs.pop("rope_type", None), rs.pop("type", None)
    if rope_type and old_type and rope_type != old_type:
        raise UserInputError(
            f"config.rope_scaling has rope_type={rope_type!r} and type={old_type!r}; they must agree"
        )
    rtype = rope_type or old_type
    rs.pop("rope_theta", None)
    if rtype in (None, "default"):
        return None
    if rtype != "yarn":
        raise UserInputError(f"config.rope_scaling type must be 'yarn' (or absent), got {rtype!r}")
    if "factor" not in rs or "original_max_position_embeddings" not in rs:
        raise UserInputError(
            "config.rope_scaling of type 'yarn' needs 'factor' and 'original_max_position_embeddings'"
        )
    unknown = set(rs) - set(_YARN_KEYS) - {"truncate", "attention_factor"}
    if unknown:
        raise UserInputError(
            f"config.rope_scaling has unknown keys {sorted(unknown)}; allowed: {_YARN_KEYS}"
        )
    check_number("config.rope_scaling.factor", rs["factor"], 1.0, strict=False)
    original = rs["original_max_position_embeddings"]
    check_int("config.rope_scaling.original_max_position_embeddings", original, 1)
    for key, strict in (("beta_fast", True), ("beta_slow", True), ("attention_factor", True),
                        ("mscale", False), ("mscale_all_dim", False)):  # fmt: skip
        if rs.get(key) is not None:
            check_number(f"config.rope_scaling.{key}", rs[key], strict=strict)
    if rs.get("truncate") is not None:
        check_bool("config.rope_scaling.truncate", rs["truncate"])
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1  # as rope.py
    if beta_fast < beta_slow:
        raise UserInputError(
            f"config.rope_scaling needs beta_fast >= beta_slow (rotations that bound YaRN's ramp, "
            f"fast above slow), got beta_fast={beta_fast}, beta_slow={beta_slow}"
        )
    return {"type": "yarn", **rs}


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


PRESETS: dict[str, dict[str, Any]] = {
    # ~2.1M parameters (~1M activated), plus a 0.5M MTP module: minutes on a 2-core CPU.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=512,
    ),
    # ~185M parameters (~69M activated per token), plus a 13M MTP module: one GPU.
    "small": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=128,
        num_hidden_layers=12,
        num_attention_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
    ),
    # ~1.45B parameters (~0.48B activated per token), plus a 0.12B MTP module: the release's
    # head and latent dims (128 + 64, kv_lora_rank 512) at hidden 2048, where matrix products
    # are large enough for MFU and FP8 to mean something; AdamW at 8 x 2048 fits one H200.
    "medium": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=16,
        q_lora_rank=768,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
    ),
    # The release's config.json (DeepSeek-V3 / V3-0324 / R1 share it).
    "v3-671b": dict(
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset ('tiny', 'small', 'medium', 'v3-671b'), with optional field overrides."""
    if name not in PRESETS:
        raise UserInputError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
