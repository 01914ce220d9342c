"""Checkpoints in the DeepSeek-V3 release's Hugging Face format: shards, FP8 blocks, the MTP layer.

A checkpoint is a directory holding ``config.json`` and either one ``model.safetensors`` or
several ``model-0000i-of-0000n.safetensors`` shards listed by ``model.safetensors.index.json``
(its ``weight_map`` says which shard holds each key). The keys are our module names, with two
exceptions the release imposes and one of ours:

* MTP module k (report §2.2) is stored as one more decoder layer, ``model.layers.{L + k}.*``
  (L = num_hidden_layers), not under ``model.mtp.{k}.*`` as here.
* That layer also carries copies of the embedding and the output matrix
  (``embed_tokens.weight``, ``shared_head.head.weight``), so that it can be served on its own.
  Our MTP modules *share* the main model's (the report's design), so we write the copies and,
  on load, check that they equal the main ones and drop them.
* Routed experts are stored expert by expert (``mlp.experts.{j}.{gate,up,down}_proj.weight``)
  but held stacked in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
  as transformers 5 holds them): each per-expert key reads into, and writes from, a view of
  its slice of the stack.

The release ships its weights in FP8 (report §3.3): every Linear weight inside the decoder
layers (not the gate, the embedding, the head or the norms) is ``float8_e4m3fn`` with a float32
``weight_scale_inv`` per 128×128 block, so that ``w ≈ q · s`` block by block (the convention of
the release's ``weight_dequant``). We dequantize on load and can write that format on save.

Loading never holds two copies of the model: it is built on the meta device (no memory), given
empty storage, then filled one tensor at a time from memory-mapped files. Saving is atomic: a
reader of ``path`` sees the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import ModelConfig
from .errors import UserInputError
from .fp8.quant import BLOCK, weight_dequant, weight_quant
from .model import DeepSeekV3
from .model.experts import Experts
from .model.rope import RotaryEmbedding

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MTP_KEY = re.compile(r"model\.mtp\.(\d+)\.(.+)")
# Keys that describe how the weights are stored, not the model; save_pretrained rewrites them.
_STORAGE_KEYS = ("quantization_config", "torch_dtype", "dtype")
_MAX_LISTED = 20  # problems listed in one error message
_LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------- FP8 blocks
def scale_shape(shape: tuple[int, ...] | list[int]) -> list[int]:
    """The shape of weight_scale_inv for a weight of ``shape``: one entry per (partial) block."""
    return [math.ceil(d / BLOCK) for d in shape]


def _fp8_config() -> dict:
    """The release's quantization_config (activations are quantized on the fly, 1×128 tiles)."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }


def _validate_quantization_config(qc: object) -> None:
    """Accept only what ``weight_dequant`` implements; name the field otherwise."""
    if not isinstance(qc, dict):
        raise ValueError(f"config.quantization_config must be a dict, got {qc!r}")
    for name, allowed in _fp8_config().items():
        optional = name in (
            "fmt",
            "activation_scheme",
        )  # the release spells them out; others may not
        value = qc.get(name, allowed if optional else None)
        if value != allowed:
            raise ValueError(
                f"config.quantization_config.{name} must be {allowed!r}, got {value!r}"
            )


# ---------------------------------------------------------------------------------- key names
def disk_key(config: ModelConfig, key: str) -> str:
    """Our parameter name → the release's key (only MTP modules move: model.mtp.k → layers.L+k)."""
    m = _MTP_KEY.fullmatch(key)
    if m is None:
        return key
    return f"model.layers.{config.num_hidden_layers + int(m[1])}.{m[2]}"


def _model_key(config: ModelConfig, key: str) -> tuple[str, bool]:
    """The release's key → (our name, is_copy). A copy names the main tensor it must equal."""
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return head, True
    m = _LAYER_KEY.fullmatch(key)
    if m is None or int(m[1]) < config.num_hidden_layers:
        return key, False
    k, rest = int(m[1]) - config.num_hidden_layers, m[2]
    copies = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": head}
    if rest in copies and k < config.num_nextn_predict_layers:
        return copies[rest], True
    return f"model.mtp.{k}.{rest}", False


def fp8_weight_names(model: DeepSeekV3) -> set[str]:
    """The weights the release stores in FP8: every nn.Linear in the decoder layers and MTP
    modules. The router (``mlp.gate``, not an nn.Linear here) stays high precision, as do the
    embedding, the head and the norms: they are small, or too sensitive (report §3.3.1)."""
    linears = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(("model.layers.", "model.mtp."))
    }
    return linears | set(_expert_weights(model))


def _expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The release's per-expert keys, each a view of the stacked ``Experts`` parameters that
    holds it: ``experts.{i}.gate_proj.weight`` = gate_up_proj[i, :I], ``up_proj`` =
    gate_up_proj[i, I:], ``down_proj`` = down_proj[i] (our names: MTP modules not moved yet)."""
    views = {}
    for name, experts in model.named_modules():
        if isinstance(experts, Experts):
            gate_up, down = experts.gate_up_proj, experts.down_proj
            i = down.shape[2]
            for j in range(len(experts)):
                views[f"{name}.{j}.gate_proj.weight"] = gate_up[j, :i]
                views[f"{name}.{j}.up_proj.weight"] = gate_up[j, i:]
                views[f"{name}.{j}.down_proj.weight"] = down[j]
    return views


# ---------------------------------------------------------------------------------- reading
class _Files:
    """A checkpoint's tensors by key, read one at a time from memory-mapped safetensors files."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.index = path / INDEX_NAME
        self.weight_map = _weight_map(path)
        self._stack = stack
        self._handles: dict[Path, object] = {}
        self._keys: dict[Path, set[str]] = {}

    def _open(self, key: str):
        file = self.weight_map[key]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(_safe_open(file))
            self._keys[file] = set(self._handles[file].keys())
        if key not in self._keys[file]:
            raise UserInputError(
                f"{self.index}: weight_map puts {key} in {file.name}, which holds no such tensor"
            )
        return self._handles[file]

    def shape(self, key: str) -> list[int]:
        return list(self._open(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The safetensors dtype name: 'BF16', 'F32', 'F8_E4M3', 'I64', 'BOOL', ..."""
        return self._open(key).get_slice(key).get_dtype()

    def read(self, key: str) -> torch.Tensor:
        """The tensor at ``key``, dequantized to fp32 when it is stored in FP8."""
        t = self._open(key).get_tensor(key)
        if t.dtype == torch.float8_e4m3fn:
            t = weight_dequant(t, self._open(key + SCALE_SUFFIX).get_tensor(key + SCALE_SUFFIX))
        return t


def _safe_open(file: Path):
    """safe_open, with an error naming the file when it is missing, truncated or not safetensors."""
    if not file.is_file():
        raise FileNotFoundError(f"no file {file}, which the checkpoint's {INDEX_NAME} lists")
    try:
        return safe_open(file, "pt")
    except SafetensorError as e:
        raise UserInputError(f"{file} is not a complete safetensors file ({e})") from None


def _weight_map(path: Path) -> dict[str, Path]:
    """key → file, from the index when there is one, else from the single file's header.

    The index names files, not paths: an entry such as ``../x`` or ``/etc/passwd`` would read a
    file outside the checkpoint, so anything but a plain file name in ``path`` is refused.
    """
    index = path / INDEX_NAME
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserInputError(f"{index} is not valid JSON ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise UserInputError(f"{index} has no weight_map (a dict from tensor key to file)")
        for key, name in weight_map.items():
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
                raise UserInputError(
                    f"{index}: weight_map[{key!r}] = {name!r} is not a file name inside the "
                    "checkpoint folder"
                )
        return {key: path / name for key, name in weight_map.items()}
    single = path / SINGLE_NAME
    if not single.exists():
        raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")
    with _safe_open(single) as f:
        return dict.fromkeys(f.keys(), single)


@dataclass
class _Plan:
    """What to copy where, decided from the files' headers before any data is read."""

    loads: list[tuple[str, str]] = field(default_factory=list)  # (disk key, our name)
    copies: list[tuple[str, str]] = field(default_factory=list)  # (disk key, main name)
    problems: list[str] = field(default_factory=list)


def _plan(config: ModelConfig, targets: dict[str, torch.Tensor], files: _Files, fp8: bool) -> _Plan:
    """Match every key on disk to a tensor of the model; collect every mismatch.

    Keys are visited file by file, so that loading then reads one shard after the other.
    """
    plan = _Plan()
    present = set()  # our names with a key on disk, loadable or not: not also "missing"
    for key in sorted(files.weight_map, key=lambda k: files.weight_map[k]):
        if key.endswith(SCALE_SUFFIX):
            continue  # checked with its weight
        ours, is_copy = _model_key(config, key)
        found = files.shape(key)
        if ours not in targets:
            plan.problems.append(f"unexpected key {key} (shape {found})")
            continue
        if not is_copy:
            present.add(ours)
        dtype = files.dtype(key)
        if not dtype.startswith(("F", "BF")):  # I64, U8, BOOL...: a cast would invent weights
            plan.problems.append(f"{key} is stored as {dtype}; weights must be floating point")
            continue
        expected = list(targets[ours].shape)
        if found != expected:
            plan.problems.append(f"{key}: expected shape {expected}, found {found}")
            continue
        plan.problems += _fp8_problems(key, files, fp8)
        (plan.copies if is_copy else plan.loads).append((key, ours))
    plan.problems += _orphan_scales(files)
    plan.problems += [
        f"missing key {disk_key(config, name)} (expected shape {list(t.shape)})"
        for name, t in targets.items()
        if name not in present
    ]
    return plan


def _mtp_absent(config: ModelConfig, weight_map: dict[str, Path]) -> bool:
    """config.json asks for MTP modules but no key of layer L or beyond exists: the checkpoint
    comes from transformers, whose save_pretrained leaves the MTP layer out."""
    return config.num_nextn_predict_layers > 0 and not any(
        (m := _LAYER_KEY.fullmatch(key)) and int(m[1]) >= config.num_hidden_layers
        for key in weight_map
    )


def _fp8_problems(key: str, files: _Files, fp8: bool) -> list[str]:
    """An FP8 tensor needs a quantization_config and a scale of the block-grid shape."""
    dtype = files.dtype(key)
    if not dtype.startswith("F8"):
        return []
    if dtype != "F8_E4M3":
        return [f"{key} is stored as {dtype}; only F8_E4M3 (e4m3fn) weights are supported"]
    if not fp8:
        return [f"{key} is stored in FP8 but config.json has no quantization_config"]
    scale = key + SCALE_SUFFIX
    expected = scale_shape(files.shape(key))
    if len(expected) != 2:
        return [f"{key} is stored in FP8 but is not a 2-D weight"]
    if scale not in files.weight_map:
        return [f"missing key {scale} (expected shape {expected}) for the FP8 weight {key}"]
    if files.shape(scale) != expected:
        return [f"{scale}: expected shape {expected}, found {files.shape(scale)}"]
    if files.dtype(scale) not in ("F32", "BF16", "F16"):
        return [f"{scale} is stored as {files.dtype(scale)}; scales must be floating point"]
    return []


def _orphan_scales(files: _Files) -> list[str]:
    """A weight_scale_inv whose weight is absent or not FP8 would be silently ignored: refuse."""
    return [
        f"unexpected key {key} (shape {files.shape(key)}): no FP8 weight "
        f"{key.removesuffix(SCALE_SUFFIX)} to scale"
        for key in files.weight_map
        if key.endswith(SCALE_SUFFIX)
        and not (
            key.removesuffix(SCALE_SUFFIX) in files.weight_map
            and files.dtype(key.removesuffix(SCALE_SUFFIX)) == "F8_E4M3"
        )
    ]


def _raise_problems(path: Path, problems: list[str]) -> None:
    if not problems:
        return
    listed = problems[:_MAX_LISTED]
    more = len(problems) - len(listed)
    tail = f"\n  ... and {more} more" if more else ""
    raise UserInputError(
        f"checkpoint at {path} does not fit the model from its config.json:\n  "
        + "\n  ".join(listed)
        + tail
    )


def _float_dtype(name: object, what: str) -> torch.dtype:
    """A dtype to load weights in, from a torch.dtype or its name ('bfloat16', 'torch.float32')."""
    dtype = name if isinstance(name, torch.dtype) else None
    if isinstance(name, str):
        dtype = getattr(torch, name.removeprefix("torch."), None)
    if dtype not in _LOAD_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in _LOAD_DTYPES)
        raise UserInputError(f"{what} must be one of {allowed} (or the torch dtype), got {name!r}")
    return dtype


def _dtype_from_config(config: ModelConfig) -> torch.dtype:
    """config.json's torch_dtype (the release) or dtype (transformers 5), else float32."""
    name = config.extra.get("torch_dtype") or config.extra.get("dtype") or "float32"
    return _float_dtype(name, "config.torch_dtype")


def _empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> DeepSeekV3:
    """The model with uninitialised storage: built on the meta device, so nothing is computed.

    The router's bias stays fp32, as the release stores it: the balancing rule nudges it by a
    small γ per step, which bf16 would round away.
    """
    with torch.device("meta"):
        model = DeepSeekV3(config).to(dtype)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives each module a new Parameter: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    _rebuild_non_persistent(model, config, device)
    return model


def _rebuild_non_persistent(model: nn.Module, config: ModelConfig, device: torch.device) -> None:
    """Recompute what the checkpoint does not hold (RoPE's inv_freq): to_empty left it garbage."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RotaryEmbedding):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, RotaryEmbedding(config).to(device))
        elif module._non_persistent_buffers_set:
            raise RuntimeError(
                f"{name or type(module).__name__} has non-persistent buffers "
                f"{sorted(module._non_persistent_buffers_set)} that checkpoint.py cannot rebuild"
            )


def _targets(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint must provide: parameters and persistent buffers, each once,
    stacked experts as the views that the release's per-expert keys fill (in expert order)."""
    experts = _expert_weights(model)
    targets = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith(".experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            targets.update((k, v) for k, v in experts.items() if k.startswith(prefix))
        elif not name.endswith(".experts.down_proj"):
            targets[name] = tensor
    if model.config.tie_word_embeddings:
        del targets["lm_head.weight"]  # the embedding itself
    return targets


def release_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` under its key in the release's files (experts one by one, as
    views of the stacks; the MTP layer's copies of the embedding and head left out)."""
    return {disk_key(model.config, name): t.detach() for name, t in _targets(model).items()}


def _check_copy(key: str, stored: torch.Tensor, main_name: str, main: torch.Tensor) -> None:
    """The release's duplicated embedding/head must equal the main one: we keep only one."""
    stored = stored.to(device=main.device, dtype=main.dtype).float()
    if not torch.allclose(stored, main.float(), rtol=1e-5, atol=1e-6, equal_nan=True):
        diff = (stored - main.float()).abs().max().item()
        raise UserInputError(
            f"{key} differs from {main_name} (max abs difference {diff:.3g}); this model shares "
            "one embedding and one output matrix between the main model and its MTP modules, "
            "so it cannot represent separate copies"
        )


def load_pretrained(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    require_mtp: bool = False,
    allow_nonfinite: bool = False,
) -> DeepSeekV3:
    """Load a checkpoint in the release's format (or transformers', or ours) into DeepSeekV3.

    ``dtype`` (a torch dtype or its name) defaults to config.json's ``torch_dtype``/``dtype``
    (bfloat16 for the release), else float32; FP8 weights are dequantized to it.

    transformers' save_pretrained leaves the MTP layer out while its config keeps
    ``num_nextn_predict_layers=1``: such a checkpoint loads as the main model alone, with a
    warning (MTP training and speculative decoding need the module), unless ``require_mtp``.

    Raises FileNotFoundError without config.json or a listed file, and UserInputError (a
    ValueError) naming the file or key for everything else: a file that is not safetensors, an
    index entry outside the folder, keys missing, unexpected, mis-shaped or not floating point,
    NaN or infinite weights (unless ``allow_nonfinite``), an MTP copy of the embedding or head
    that differs from the main one.
    """
    path = Path(path)
    if path.is_file():
        raise UserInputError(
            f"{path} is a file; pass the checkpoint folder that holds config.json and the weights"
        )
    from .convert import reject_official  # here: convert.py builds on this module

    reject_official(path)  # DeepSeek's inference format: say how to convert it
    config = ModelConfig.load(path)
    qc = config.extra.get("quantization_config")
    if qc is not None:
        _validate_quantization_config(qc)
    dtype = _dtype_from_config(config) if dtype is None else _float_dtype(dtype, "dtype")
    config = config.replace(extra={k: v for k, v in config.extra.items() if k not in _STORAGE_KEYS})
    device = torch.device(device)
    with ExitStack() as stack, torch.no_grad():
        files = _Files(path, stack)
        if _mtp_absent(config, files.weight_map):
            config = _without_mtp(path, config, require_mtp)
        model = _empty_model(config, device, dtype)
        targets = _targets(model)
        plan = _plan(config, targets, files, fp8=qc is not None)
        _raise_problems(path, plan.problems)
        nonfinite = []
        for key, name in plan.loads:
            if not targets[name].copy_(files.read(key)).isfinite().all():
                nonfinite.append(key)
        if nonfinite and not allow_nonfinite:
            raise UserInputError(
                f"checkpoint at {path} holds NaN or infinite values in {len(nonfinite)} "
                f"tensor(s): {', '.join(nonfinite[:_MAX_LISTED])} "
                "(allow_nonfinite=True loads it anyway)"
            )
        for key, name in plan.copies:
            _check_copy(key, files.read(key), name, targets[name])
    return model.eval()


def _without_mtp(path: Path, config: ModelConfig, require_mtp: bool) -> ModelConfig:
    """The config of the main model alone, for a checkpoint without its MTP layer; say so."""
    layers = f"model.layers.{config.num_hidden_layers}.*"
    if require_mtp:
        raise UserInputError(
            f"checkpoint at {path} holds no MTP weights ({layers}) although config.json has "
            f"num_nextn_predict_layers={config.num_nextn_predict_layers}; transformers' "
            "save_pretrained leaves them out"
        )
    warnings.warn(
        f"checkpoint at {path} holds no MTP weights ({layers}), as transformers writes it: "
        "loading the main model alone (num_nextn_predict_layers=0), so MTP training and "
        "speculative decoding are off; require_mtp=True refuses such checkpoints",
        stacklevel=3,
    )
    return config.replace(num_nextn_predict_layers=0)


# ---------------------------------------------------------------------------------- writing
@dataclass
class _Entry:
    """One tensor to write under ``key``; ``fp8`` adds its weight_scale_inv beside it, ``clone``
    marks a tensor sharing its storage with others — an MTP copy, an expert's slice of the
    stacked weights — which is copied (safetensors refuses two keys sharing one storage)."""

    key: str
    tensor: torch.Tensor
    fp8: bool = False
    clone: bool = False

    @property
    def nbytes(self) -> int:
        if self.fp8:
            return self.tensor.numel() + 4 * math.prod(scale_shape(self.tensor.shape))
        return self.tensor.numel() * self.tensor.element_size()

    def materialize(self) -> dict[str, torch.Tensor]:
        """The tensors to write: on the CPU, contiguous, quantized if asked."""
        t = self.tensor.detach()
        if self.fp8:
            q, scale = weight_quant(t.float())  # 128×128 blocks: weight_scale_inv
            return {self.key: q.cpu(), self.key + SCALE_SUFFIX: scale.cpu()}
        return {self.key: t.to("cpu", copy=self.clone).contiguous()}


def _entries(model: DeepSeekV3, fp8: bool) -> list[_Entry]:
    """Every tensor of the checkpoint in the release's names, the MTP copies included."""
    config = model.config
    quantized = fp8_weight_names(model) if fp8 else set()
    views = set(_expert_weights(model))
    entries = [
        _Entry(disk_key(config, name), tensor, name in quantized, clone=name in views)
        for name, tensor in _targets(model).items()
    ]
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    for k in range(config.num_nextn_predict_layers):
        layer = f"model.layers.{config.num_hidden_layers + k}"
        entries.append(_Entry(f"{layer}.embed_tokens.weight", embed, clone=True))
        entries.append(_Entry(f"{layer}.shared_head.head.weight", head, clone=True))
    return entries


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Greedy packing in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' (10^9) or '512MiB' (2^20), as transformers."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"max_shard_size must be bytes or like '5GB'/'512MiB', got {size!r}")
    unit = m[2].upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m[1]) * base ** ("KMG".index(unit[0]) + 1))


def _config_json(model: DeepSeekV3, fp8: bool) -> dict:
    """config.json: ModelConfig.to_dict() plus how the weights are stored (dtype, FP8 blocks)."""
    d = model.config.to_dict()
    for key in _STORAGE_KEYS:
        d.pop(key, None)
    d["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    if fp8:
        d["quantization_config"] = _fp8_config()
    return d


def save_pretrained(
    model: DeepSeekV3,
    path: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    fp8: bool = False,
) -> None:
    """Write ``model`` in the release's format, atomically, replacing any checkpoint at ``path``.

    Tensors keep their dtype; with ``fp8=True`` the decoder's Linear weights are stored as the
    release stores them (E4M3 + a float32 scale per 128×128 block). More than ``max_shard_size``
    bytes in all (an int, or a string like '5GB') → numbered shards and an index. Other files in
    an existing checkpoint directory (a tokenizer, say) are kept. One writer per ``path`` at a
    time: a save first clears what an earlier, killed one left behind.
    """
    with _atomic_dir(Path(path)) as tmp:
        write_model_files(model, tmp, max_shard_size=max_shard_size, fp8=fp8)


def write_model_files(
    model: DeepSeekV3,
    folder: Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    fp8: bool = False,
) -> None:
    """config.json and the safetensors files of ``model`` into the existing ``folder``, not
    atomically: save_pretrained makes a folder atomic around it, and the trainer, whose
    checkpoints hold more files, does the same in ``train/resume.py``."""
    shards = _shards(_entries(model, fp8), parse_size(max_shard_size))
    (folder / CONFIG_NAME).write_text(json.dumps(_config_json(model, fp8), indent=2) + "\n")
    _write_shards(folder, shards)


def _write_shards(folder: Path, shards: list[list[_Entry]]) -> None:
    """One safetensors file per shard, materialized one shard at a time; an index if several."""
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = (
            SINGLE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {k: v for entry in shard for k, v in entry.materialize().items()}
        safetensors.torch.save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _is_ours(name: str) -> bool:
    """The files save_pretrained writes (and so replaces)."""
    return name in (CONFIG_NAME, SINGLE_NAME, INDEX_NAME) or bool(_SHARD_NAME.fullmatch(name))


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield ``.name.tmp``, a fresh sibling of ``path`` to fill; on success it replaces ``path``.

    Rename is atomic within a filesystem, so ``path`` holds either the old directory or the
    complete new one; everything is fsynced first, so a crash after the rename cannot expose
    empty files either. An existing target is renamed to ``.name.old`` and deleted after the
    second rename. A save killed before the renames leaves ``.name.tmp``, deleted by the next
    save; one killed between them leaves the old checkpoint at ``.name.old`` and nothing at
    ``path``, and the next save first puts it back. On an error (not a kill) the temporary
    directory is removed.
    """
    tmp, aside = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if aside.exists():
        if path.exists():  # killed after the second rename: the new checkpoint is in place
            shutil.rmtree(aside)
        else:
            os.rename(aside, path)
    if path.exists() and not (path.is_dir() and _replaceable(path)):
        raise FileExistsError(f"{path} exists and is not a checkpoint directory; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            _carry_over(path, tmp)
        fsync_tree(tmp)
        _replace(tmp, path, aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replaceable(path: Path) -> bool:
    """An empty directory or a checkpoint: never replace a folder that merely has that name."""
    return (path / CONFIG_NAME).exists() or not any(path.iterdir())


def _carry_over(old: Path, new: Path) -> None:
    """Copy the files we do not write (tokenizer, generation config, ...) into the new dir."""
    for entry in old.iterdir():
        if _is_ours(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name)
        else:
            shutil.copy2(entry, new / entry.name)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (root included) to disk."""
    for p in [*root.rglob("*"), root]:
        fsync_path(p)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (renames, new names), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path, aside: Path) -> None:
    """Rename ``tmp`` to ``path``, moving an existing ``path`` to ``aside`` and deleting it after."""
    if path.exists():
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        if aside.exists():
            os.rename(aside, path)
        raise
    fsync_path(path.parent)
    shutil.rmtree(aside, ignore_errors=True)
