"""Convert between the release's format and DeepSeek's own inference format, both ways.

The release (like transformers and ``save_pretrained``) names tensors after transformers'
modules and shards them by size. DeepSeek's inference code (the format its
``inference/convert.py`` writes) renames them after its own modules and cuts the model into
one file per model-parallel rank, ``model{i}-mp{mp}.safetensors``:

    release                            inference format        across ranks
    model.embed_tokens                 embed                   cut along the vocabulary (dim 0)
    model.layers.0.                    layers.0.
      input_layernorm                    attn_norm             whole on every rank
      self_attn.q_a_proj                 attn.wq_a             whole
      self_attn.q_a_layernorm            attn.q_norm           whole
      self_attn.q_b_proj (or q_proj)     attn.wq_b (or wq)     cut along dim 0
      self_attn.kv_a_proj_with_mqa       attn.wkv_a            whole
      self_attn.kv_a_layernorm           attn.kv_norm          whole
      self_attn.kv_b_proj                attn.wkv_b            cut along dim 0
      self_attn.o_proj                   attn.wo               cut along dim 1
      post_attention_layernorm           ffn_norm              whole
      mlp.gate_proj / up_proj / down_proj  ffn.w1 / w3 / w2    cut along dim 0 / 0 / 1
      mlp.gate, e_score_correction_bias  ffn.gate, bias        whole
      mlp.shared_experts.gate_proj ...   ffn.shared_experts.w1 ...   like ffn.w1 ...
      mlp.experts.{j}.gate_proj ...      ffn.experts.{j}.w1 ...      whole, on one rank
      ....weight_scale_inv               ....scale             like its weight
    model.norm                         norm                    whole
    lm_head                            head                    cut along the vocabulary (dim 0)

Column-parallel linears (``wq``, ``wq_b``, ``wkv_b``, ``w1``, ``w3``) are cut along their
output dim, row-parallel ones (``wo``, ``w2``) along their input dim, so that each rank computes
its share and one all-reduce adds them. Routed experts are not cut: rank r holds experts
[r·E/mp, (r+1)·E/mp). Everything else (norms, the gate, ``wq_a``, ``wkv_a``) is copied to every
rank. An FP8 weight's ``scale`` grid is cut like its weight, so a cut must fall on a 128 block.

What the inference format lacks, we add beside it: its hyper-parameters live in a ModelArgs
JSON (written here as ``model_args.json``; DeepSeek ships them as ``configs/config_*.json``),
and its convert.py drops the MTP layer (``model.layers.{L}.*``), which we keep in
``mtp{i}-mp{mp}.safetensors`` with the same names and cuts, so that DeepSeek's strict loader
still reads ``model{i}-mp{mp}.safetensors`` unchanged.

Routing: DeepSeek's Gate has a bias only in the 671B model; without one it scores an expert
group by its best expert, not by its two best. Converting such a checkpoint sets
``group_score="max"``, so that it routes here as it does there, and such a model converts to
the inference format without its bias (which must be zero). Any other config keeps its bias,
as DeepSeek's convert.py does, although DeepSeek's model has a slot for one only at the 671B
shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm import tqdm

from .checkpoint import (
    BLOCK,
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    _atomic_dir,
    _Files,
    _fp8_config,
    _mtp_absent,
    _plan,
    _shards,
    _targets,
    _weight_map,
    _write_shards,
)
from .config import ModelConfig
from .errors import UserInputError, check_int
from .model import DeepSeekV3

ARGS_NAME = "model_args.json"
_RANK_FILE = re.compile(r"(model|mtp)(\d+)-mp(\d+)\.safetensors")
_RELEASE_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OFFICIAL_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r".*\.experts\.(\d+)\..*")
_MAX_LISTED = 20  # problems listed in one error message

# ---------------------------------------------------------------------------------- names
_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
# Inside a layer, names change segment by segment; the MTP layer's own parts (enorm, hnorm,
# eh_proj, shared_head.norm, shared_head.head) keep theirs.
_SEGMENTS = {
    "self_attn": "attn",
    "mlp": "ffn",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "embed_tokens": "embed",
    "e_score_correction_bias": "bias",
    "weight_scale_inv": "scale",
}
_TOP_INVERSE = {v: k for k, v in _TOP.items()}
_SEGMENTS_INVERSE = {v: k for k, v in _SEGMENTS.items()}
# The dim a module's weight (and scale) is cut along across ranks; absent: copied to every rank.
_SPLIT_DIM = {
    **dict.fromkeys(("embed", "head", "wq", "wq_b", "wkv_b", "w1", "w3"), 0),  # column-parallel
    **dict.fromkeys(("wo", "w2"), 1),  # row-parallel
}


def official_name(key: str) -> str:
    """A release key → the inference format's: model.layers.0.self_attn.q_a_proj.weight →
    layers.0.attn.wq_a.weight."""
    if key in _TOP:
        return _TOP[key]
    m = _RELEASE_LAYER.fullmatch(key)
    if m is None:
        raise UserInputError(f"{key} is not a key of the release's format")
    return f"layers.{m[1]}." + ".".join(_SEGMENTS.get(s, s) for s in m[2].split("."))


def release_name(key: str) -> str:
    """The inference format's key → the release's (the inverse of ``official_name``)."""
    if key in _TOP_INVERSE:
        return _TOP_INVERSE[key]
    m = _OFFICIAL_LAYER.fullmatch(key)
    if m is None:
        raise UserInputError(f"{key} is not a key of DeepSeek's inference format")
    return f"model.layers.{m[1]}." + ".".join(_SEGMENTS_INVERSE.get(s, s) for s in m[2].split("."))


def placement(name: str, n_routed_experts: int, mp: int) -> tuple[int | None, int | None]:
    """Where an inference-format tensor lives across ``mp`` ranks, as (rank, dim): a routed
    expert's whole on one rank (rank, None); any other on every rank, cut along ``dim``
    (None, dim), or whole (None, None)."""
    m = _EXPERT.fullmatch(name)
    if m is not None:
        return int(m[1]) // (n_routed_experts // mp), None
    return None, _SPLIT_DIM.get(name.split(".")[-2])


# ---------------------------------------------------------------------------------- configs
# ModelArgs fields that are one ModelConfig field each (inference/model.py → config.json)
_ARGS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
}
# ModelArgs' defaults, which fill whatever a JSON leaves out (DeepSeek's configs omit many)
_ARGS_DEFAULTS = {
    "max_batch_size": 8,
    "max_seq_len": 4096 * 4,
    "dtype": "bf16",
    "scale_fmt": None,
    "vocab_size": 102400,
    "dim": 2048,
    "inter_dim": 10944,
    "moe_inter_dim": 1408,
    "n_layers": 27,
    "n_dense_layers": 1,
    "n_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "n_activated_experts": 6,
    "n_expert_groups": 1,
    "n_limited_groups": 1,
    "score_func": "softmax",
    "route_scale": 1.0,
    "q_lora_rank": 0,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "original_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_factor": 40,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
}


def official_args(config: ModelConfig, fp8: bool) -> dict:
    """The ModelArgs JSON of ``config``; UserInputError listing what DeepSeek's model, which
    hard-codes a few choices, cannot represent."""
    c, rs = config, config.rope_scaling
    problems = []
    if c.rms_norm_eps != 1e-6:
        problems.append(f"rms_norm_eps={c.rms_norm_eps} (its RMSNorm uses 1e-6)")
    if not c.rope_interleave:
        problems.append("rope_interleave=False (it rotates interleaved pairs)")
    if c.n_routed_experts and c.norm_topk_prob != (c.scoring_func == "sigmoid"):
        problems.append(
            f"norm_topk_prob={c.norm_topk_prob} with scoring_func={c.scoring_func!r} (its gate "
            "renormalises the top-k weights exactly when scores are sigmoids)"
        )
    if c.n_routed_experts and not c.n_shared_experts:
        problems.append("n_shared_experts=0 (its MoE layers always have shared experts)")
    if rs and (not rs.get("mscale") or rs.get("mscale") != rs.get("mscale_all_dim")):
        problems.append(
            f"rope_scaling mscale={rs.get('mscale')!r}, mscale_all_dim={rs.get('mscale_all_dim')!r}"
            " (its YaRN has one mscale, in the softmax scale only: they must be equal)"
        )
    if rs and c.max_position_embeddings <= rs["original_max_position_embeddings"]:
        problems.append(
            "max_position_embeddings <= rope_scaling.original_max_position_embeddings (it "
            "applies YaRN only to a longer context)"
        )
    if problems:
        raise UserInputError(
            "DeepSeek's inference format cannot represent this config: " + "; ".join(problems)
        )
    args = {name: getattr(c, field) for name, field in _ARGS.items()}
    args["n_dense_layers"] = c.first_k_dense_replace if c.n_routed_experts else c.num_hidden_layers
    args["q_lora_rank"] = c.q_lora_rank or 0
    args["original_seq_len"] = rs["original_max_position_embeddings"] if rs else args["max_seq_len"]
    if rs:
        args |= {"rope_factor": rs["factor"], "mscale": rs["mscale"]}
        args |= {"beta_fast": rs.get("beta_fast") or 32, "beta_slow": rs.get("beta_slow") or 1}
    args["dtype"] = "fp8" if fp8 else "bf16"
    return args


def config_from_args(args: dict, *, gate_bias: bool) -> ModelConfig:
    """The ModelConfig of a ModelArgs JSON (no MTP layer: ModelArgs has none). ``gate_bias``:
    whether the checkpoint's gates have a bias; without one, groups are scored by their max."""
    unknown = sorted(set(args) - set(_ARGS_DEFAULTS))
    if unknown:
        raise UserInputError(
            f"ModelArgs has no fields {unknown}; allowed: {sorted(_ARGS_DEFAULTS)}"
        )
    a = _ARGS_DEFAULTS | args
    yarn = {
        "type": "yarn",
        "factor": a["rope_factor"],
        "original_max_position_embeddings": a["original_seq_len"],
        "beta_fast": a["beta_fast"],
        "beta_slow": a["beta_slow"],
        "mscale": a["mscale"],  # DeepSeek's one mscale scales the softmax, not cos/sin
        "mscale_all_dim": a["mscale"],
    }
    return ModelConfig(
        **{field: a[name] for name, field in _ARGS.items()},
        first_k_dense_replace=a["n_dense_layers"],
        q_lora_rank=a["q_lora_rank"] or None,
        norm_topk_prob=a["score_func"] == "sigmoid",
        group_score="top2_sum" if gate_bias or a["n_expert_groups"] == 1 else "max",
        # DeepSeek's code turns YaRN on only for a context longer than the original one
        rope_scaling=yarn if a["max_seq_len"] > a["original_seq_len"] else None,
        num_nextn_predict_layers=0,
    )


# ---------------------------------------------------------------------------------- checks
def is_official(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder in DeepSeek's inference format (it holds model{i}-mp{n})."""
    path = Path(path)
    return path.is_dir() and any(_RANK_FILE.fullmatch(p.name) for p in path.iterdir())


def reject_official(path: str | os.PathLike) -> None:
    """Raise UserInputError, with the command that converts it, if ``path`` is in DeepSeek's
    inference format: the loader reads the release's names only."""
    path = Path(path)
    if not is_official(path):
        return
    command = ["python", "-m", "dsv3lite", "convert", str(path), f"{path}-hf", "--to", "hf"]
    hint = ""
    if not (path / ARGS_NAME).exists():
        command += ["--config", "ARGS.json"]
        hint = " (ARGS.json: its ModelArgs, e.g. DeepSeek's inference/configs/config_671B.json)"
    raise UserInputError(
        f"{path} looks like DeepSeek's inference format (model{{i}}-mp{{n}}.safetensors, names "
        f"like layers.0.attn.wq_a.weight); convert it first: {shlex.join(command)}{hint}"
    )


def _release_problems(folder: Path, config: ModelConfig) -> list[str]:
    """What load_pretrained would refuse in the release-format checkpoint at ``folder``
    (keys, shapes, FP8 scales), from the files' headers only: no tensor is read."""
    with torch.device("meta"):
        targets = _targets(DeepSeekV3(config))
    with ExitStack() as stack:
        fp8 = "quantization_config" in config.extra
        return _plan(config, targets, _Files(folder, stack), fp8).problems


def _raise(message: str, problems: list[str]) -> None:
    if problems:
        more = len(problems) - _MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise UserInputError(message + ":\n  " + "\n  ".join(problems[:_MAX_LISTED]) + tail)


def _check_free(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserInputError(f"{dst} exists and is not empty; convert into a new folder")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files travel with the weights (as DeepSeek's convert.py copies them)."""
    for file in src.glob("*token*"):
        if file.is_file():
            shutil.copy2(file, dst / file.name)


# ---------------------------------------------------------------------------------- → official
def to_official(src: str | os.PathLike, dst: str | os.PathLike, mp: int = 1) -> None:
    """Convert the release-format checkpoint ``src`` into DeepSeek's inference format at ``dst``
    for ``mp`` model-parallel ranks, one rank's file in memory at a time; atomic."""
    src, dst = Path(src), Path(dst)
    check_int("mp", mp, 1)
    reject_official(src)
    _check_free(dst)
    config = ModelConfig.load(src)
    weight_map = _weight_map(src)
    if _mtp_absent(config, weight_map):  # transformers' checkpoints: the main model alone
        config = config.replace(num_nextn_predict_layers=0)
    args = official_args(config, fp8="quantization_config" in config.extra)
    _raise(f"checkpoint at {src} does not fit its config.json", _release_problems(src, config))
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, "pt")) for f in set(weight_map.values())}
        slices = {key: handles[f].get_slice(key) for key, f in weight_map.items()}
        if config.tie_word_embeddings:  # the inference format always has a head of its own
            slices["lm_head.weight"] = slices["model.embed_tokens.weight"]
        if config.group_score == "max":  # the inference format's sign for it: no gate bias
            _drop_zero_biases(slices)
        _raise(f"cannot cut {src} into {mp} ranks", _split_problems(slices, config, mp))
        with (
            _atomic_dir(dst) as tmp,
            tqdm(total=mp * len(slices), unit="tensor", disable=None) as bar,
        ):
            for rank in range(mp):
                _write_rank(tmp, slices, config, rank, mp, bar)
            (tmp / ARGS_NAME).write_text(json.dumps(args, indent=2) + "\n")
            _copy_tokenizer(src, tmp)


def _drop_zero_biases(slices: dict) -> None:
    """Remove the gate biases, which must be zero: a checkpoint routed by max has none."""
    for key in [k for k in slices if k.endswith("e_score_correction_bias")]:
        if slices.pop(key)[:].abs().max() > 0:
            raise UserInputError(
                f"{key} is not zero but group_score is 'max': DeepSeek's inference code scores "
                "groups by their max only when its gate has no bias"
            )


def _split_problems(slices: dict, config: ModelConfig, mp: int) -> list[str]:
    """Every tensor that does not cut evenly into ``mp`` parts (FP8: on 128 blocks)."""
    if config.n_routed_experts % mp:
        return [f"n_routed_experts={config.n_routed_experts} is not divisible by {mp}"]
    problems = []
    for key, sl in slices.items():
        dim = placement(official_name(key), config.n_routed_experts, mp)[1]
        if dim is None:
            continue
        size = sl.get_shape()[dim]
        if size % mp:
            problems.append(f"{key}: dim {dim} of size {size} is not divisible by {mp}")
        elif sl.get_dtype().startswith("F8") and (size // mp) % BLOCK:
            problems.append(
                f"{key} is FP8 and dim {dim} of size {size} cuts into parts of {size // mp}, not "
                f"a multiple of its {BLOCK}-wide scale blocks"
            )
    return problems


def _write_rank(
    folder: Path, slices: dict, config: ModelConfig, rank: int, mp: int, bar: tqdm
) -> None:
    """Rank ``rank``'s files: the main model's tensors, then the MTP layer's (if any)."""
    files: dict[str, dict[str, torch.Tensor]] = {"model": {}, "mtp": {}}
    for key, sl in slices.items():
        name = official_name(key)
        holder, dim = placement(name, config.n_routed_experts, mp)
        if holder in (None, rank):
            m = _OFFICIAL_LAYER.fullmatch(name)
            mtp = m is not None and int(m[1]) >= config.num_hidden_layers
            files["mtp" if mtp else "model"][name] = _part(sl, dim, rank, mp)
        bar.update()
    for prefix, tensors in files.items():
        if tensors:
            path = folder / f"{prefix}{rank}-mp{mp}.safetensors"
            safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def _part(sl, dim: int | None, rank: int, mp: int) -> torch.Tensor:
    """Rank ``rank``'s part of a tensor, read from disk alone (a safetensors slice)."""
    if dim is None:
        return sl[:]
    size = sl.get_shape()[dim] // mp
    index = [slice(None)] * len(sl.get_shape())
    index[dim] = slice(rank * size, (rank + 1) * size)
    return sl[tuple(index)].contiguous()


# ---------------------------------------------------------------------------------- → release
@dataclass
class _Lazy:
    """One release tensor, read (and its parts joined) only when its shard is written: what
    checkpoint's shard writer needs of an entry (key, nbytes, materialize)."""

    key: str
    nbytes: int
    read: Callable[[], torch.Tensor]

    def materialize(self) -> dict[str, torch.Tensor]:
        return {self.key: self.read()}


_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}


def to_hf(
    src: str | os.PathLike, dst: str | os.PathLike, config: str | os.PathLike | None = None
) -> None:
    """Convert DeepSeek's inference format at ``src`` into the release's format at ``dst``.

    ``config``: the ModelArgs JSON (default: ``src``/model_args.json, which ``to_official``
    writes; DeepSeek's own folders need theirs, e.g. inference/configs/config_671B.json).
    Writes size-limited shards one at a time, each tensor's parts joined as it is written;
    checks the result as load_pretrained would before it appears at ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if not is_official(src):
        raise UserInputError(
            f"{src} holds no model{{i}}-mp{{n}}.safetensors: it is not in DeepSeek's inference "
            "format (--to official converts from the release's format)"
        )
    _check_free(dst)
    args_path = Path(config) if config is not None else src / ARGS_NAME
    if not args_path.is_file():
        raise UserInputError(
            f"no {ARGS_NAME} in {src}: pass DeepSeek's ModelArgs JSON with --config "
            "(e.g. its inference/configs/config_671B.json)"
        )
    try:
        args = json.loads(args_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{args_path} is not a JSON file: {err}") from None
    if not isinstance(args, dict):
        raise UserInputError(f"{args_path} must hold a JSON object, got {type(args).__name__}")
    with ExitStack() as stack:
        ranks = _open_ranks(src, stack)
        keys = sorted({k for rank in ranks for k in rank}, key=_layer_order)
        gate_bias = any(k.endswith(".ffn.gate.bias") for k in keys)
        layers = {int(m[1]) for k in keys if (m := _OFFICIAL_LAYER.fullmatch(k))}
        model_config = config_from_args(args, gate_bias=gate_bias)
        mtp = len({i for i in layers if i >= model_config.num_hidden_layers})
        model_config = model_config.replace(num_nextn_predict_layers=mtp)
        entries, problems = _release_entries(ranks, keys, model_config)
        _raise(f"the rank files in {src} do not fit together", problems)
        bar = stack.enter_context(tqdm(total=len(entries), unit="tensor", disable=None))
        for entry in entries:
            entry.read = partial(_counted, entry.read, bar)
        with _atomic_dir(dst) as tmp:
            (tmp / CONFIG_NAME).write_text(
                json.dumps(_config_json(model_config, ranks), indent=2) + "\n"
            )
            _write_shards(tmp, _shards(entries, DEFAULT_MAX_SHARD_SIZE))
            final = ModelConfig.load(tmp)
            _raise(f"{src} does not fit {args_path}", _release_problems(tmp, final))
            _copy_tokenizer(src, tmp)


def _open_ranks(src: Path, stack: ExitStack) -> list[dict]:
    """Per rank, key → slice over its model (and MTP) file; every rank 0..mp-1 must be there."""
    found = [m for p in src.iterdir() if (m := _RANK_FILE.fullmatch(p.name))]
    counts = {int(m[3]) for m in found}
    if len(counts) != 1:
        raise UserInputError(
            f"{src} must hold model{{i}}-mp{{n}}.safetensors files for one n, found "
            f"{sorted(m[0] for m in found) or 'none'}"
        )
    mp = counts.pop()
    ranks: list[dict] = [{} for _ in range(mp)]
    for prefix in ("model", "mtp"):
        names = [f"{prefix}{i}-mp{mp}.safetensors" for i in range(mp)]
        present = [(src / n).exists() for n in names]
        if prefix == "mtp" and not any(present):
            continue
        if not all(present):
            missing = [n for n, p in zip(names, present) if not p]
            raise UserInputError(f"{src} lacks {missing} of its {mp} ranks")
        for rank, name in zip(ranks, names):
            f = stack.enter_context(safe_open(src / name, "pt"))
            rank.update({key: f.get_slice(key) for key in f.keys()})
    return ranks


def _layer_order(key: str) -> tuple[int, str]:
    """Embedding, layers in order, then the final norm and head: the release's order."""
    m = _OFFICIAL_LAYER.fullmatch(key)
    return (int(m[1]) if m else -1 if key.startswith("embed") else 1 << 30), key


def _release_entries(
    ranks: list[dict], keys: list[str], config: ModelConfig
) -> tuple[list[_Lazy], list[str]]:
    """One lazy entry per release tensor, and every way the ranks' files disagree."""
    entries, problems = [], []
    for key in keys:
        holder, dim = placement(key, config.n_routed_experts, len(ranks))
        found = [i for i, rank in enumerate(ranks) if key in rank]
        expected = list(range(len(ranks))) if holder is None else [holder]
        if found != expected:
            problems.append(f"{key} is in the files of ranks {found}, expected {expected}")
            continue
        holders = [ranks[i][key] for i in found]
        dtype = holders[0].get_dtype()
        if dtype not in _BYTES:
            problems.append(f"{key} is stored as {dtype}; weights must be floating point")
            continue
        parts = holders if dim is not None else holders[:1]
        shape = holders[0].get_shape()
        nbytes = _BYTES[dtype] * len(parts) * math.prod(shape)
        entries.append(_Lazy(release_name(key), nbytes, partial(_join, parts, dim)))
        bias = key.removesuffix("weight") + "bias"
        if key.endswith(".ffn.gate.weight") and bias not in keys:  # the release always has one
            entries.append(_Lazy(release_name(bias), 4 * shape[0], partial(torch.zeros, shape[0])))
    return entries, problems


def _join(parts: list, dim: int | None) -> torch.Tensor:
    tensors = [p[:] for p in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _counted(read: Callable[[], torch.Tensor], bar: tqdm) -> torch.Tensor:
    tensor = read()
    bar.update()
    return tensor


def _config_json(config: ModelConfig, ranks: list[dict]) -> dict:
    """config.json, with how the weights are stored: the embedding's dtype, FP8 if any."""
    d = config.to_dict()
    embed = ranks[0].get("embed.weight")
    dtype = embed.get_dtype() if embed is not None else "F32"
    d["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32")
    if any(sl.get_dtype() == "F8_E4M3" for sl in ranks[0].values()):
        d["quantization_config"] = _fp8_config()
    return d
