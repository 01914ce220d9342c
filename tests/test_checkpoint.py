"""Checkpoint I/O: round trips (plain, sharded, FP8), the release's MTP layout, errors, atomicity."""

import json
import math
import os

import pytest
import safetensors.torch
import torch
from models import random_model
from safetensors.torch import load_file, save_file

from dsv3lite import DeepSeekV3, load_pretrained, preset, save_pretrained
from dsv3lite.checkpoint import INDEX_NAME, SCALE_SUFFIX, SINGLE_NAME, release_state_dict
from dsv3lite.fp8 import weight_dequant, weight_quant
from dsv3lite.testing import rel_err


def _ids(model: DeepSeekV3, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 16))


def _assert_same_state(a: DeepSeekV3, b: DeepSeekV3) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _rewrite(path, change) -> None:
    """Apply ``change`` to the tensors of a single-file checkpoint."""
    tensors = load_file(path / SINGLE_NAME)
    change(tensors)
    save_file(tensors, path / SINGLE_NAME, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": True}, {"q_lora_rank": None, "num_nextn_predict_layers": 2}],
    ids=["mtp1", "tied", "no-q-lora-mtp2"],
)
def test_round_trip_is_exact(overrides, tmp_path):
    model = random_model(**overrides)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    _assert_same_state(model, loaded)
    assert loaded.model.rotary_emb.inv_freq.equal(model.model.rotary_emb.inv_freq)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = _ids(model)
    with torch.no_grad():
        out, out2 = model(ids, mtp=True), loaded(ids, mtp=True)
    logits, mtp, logits2, mtp2 = out.logits, out.mtp_logits, out2.logits, out2.mtp_logits
    assert torch.equal(logits, logits2)
    assert len(mtp) == model.config.num_nextn_predict_layers
    assert all(torch.equal(x, y) for x, y in zip(mtp, mtp2))


def test_release_layout_of_the_mtp_module(tmp_path):
    """MTP module k is stored as layer L+k, with copies of the embedding and the head."""
    model = random_model()
    save_pretrained(model, tmp_path)
    stored = load_file(tmp_path / SINGLE_NAME)
    mtp = f"model.layers.{model.config.num_hidden_layers}"
    assert not any(key.startswith("model.mtp.") for key in stored)
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_b_proj"):
        assert f"{mtp}.{name}.weight" in stored
    assert stored[f"{mtp}.embed_tokens.weight"].equal(model.model.embed_tokens.weight)
    assert stored[f"{mtp}.shared_head.head.weight"].equal(model.lm_head.weight)
    assert stored[f"{mtp}.mlp.gate.e_score_correction_bias"].abs().sum() > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config


def test_sharded_round_trip(tmp_path):
    model = random_model()
    save_pretrained(model, tmp_path, max_shard_size=64 * 1024)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted({name for name in index["weight_map"].values()})
    assert len(shards) > 3 and not (tmp_path / SINGLE_NAME).exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for name in shards:
        tensors = load_file(tmp_path / name)
        assert all(index["weight_map"][key] == name for key in tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    # + the two MTP copies; each stack of experts (2 tensors) is written as 3 keys per expert
    per_expert = sum(3 * len(moe.experts) - 2 for moe in model.moe_layers())
    assert len(index["weight_map"]) == len(model.state_dict()) + 2 + per_expert
    _assert_same_state(model, load_pretrained(tmp_path))


def test_dtype_from_config_and_override(tmp_path):
    """A bf16 model is saved in bf16 and loads in bf16 unless asked; the router bias stays fp32."""
    model = random_model().to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    as_fp32 = load_pretrained(tmp_path, dtype=torch.float32)
    assert as_fp32.lm_head.weight.dtype == torch.float32
    assert as_fp32.lm_head.weight.equal(model.lm_head.weight.float())


def test_fp8_round_trip(tmp_path):
    model = random_model(seed=2)
    save_pretrained(model, tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    stored = load_file(tmp_path / SINGLE_NAME)
    fp8 = {k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    expected = {
        k for k, t in stored.items()
        if t.dim() == 2 and k.startswith("model.layers.") and k.endswith(("_proj.weight", "_mqa.weight"))
    }  # fmt: skip
    assert fp8 == expected and any(".eh_proj." in k for k in fp8)
    assert {k for k in stored if k.endswith(SCALE_SUFFIX)} == {k + SCALE_SUFFIX for k in fp8}

    loaded = load_pretrained(tmp_path)
    state, original = release_state_dict(loaded), release_state_dict(model)
    for key, value in state.items():
        if key in fp8:
            assert value.equal(weight_dequant(stored[key], stored[key + SCALE_SUFFIX]))
            assert rel_err(value, original[key]) < 0.04, key  # E4M3 keeps 3 mantissa bits
        else:
            assert value.equal(original[key]), key
    ids = _ids(model)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 0.05


def _reference_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Block by block, as the release's weight_dequant does it, written as plainly as possible."""
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def test_fp8_ragged_edge_blocks(tmp_path):
    """Dimensions of 200 and 300 leave partial edge blocks, each with a scale of its own."""
    model = random_model(seed=3, hidden_size=200, intermediate_size=300, moe_intermediate_size=136,
                   num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)  # fmt: skip
    save_pretrained(model, tmp_path, fp8=True)
    stored = load_file(tmp_path / SINGLE_NAME)
    loaded = release_state_dict(load_pretrained(tmp_path))
    original = release_state_dict(model)
    ragged = 0
    for key in [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn]:
        q, s = stored[key], stored[key + SCALE_SUFFIX]
        assert list(s.shape) == [math.ceil(d / 128) for d in q.shape], key
        ragged += any(d % 128 for d in q.shape)
        assert loaded[key].equal(_reference_dequant(q, s)), key
        w = original[key]
        corner = w[(s.shape[0] - 1) * 128 :, (s.shape[1] - 1) * 128 :]
        assert s[-1, -1].item() == pytest.approx(corner.abs().max().item() / 448, rel=1e-6)
    assert ragged >= 8


def test_weight_quant_convention():
    """w ≈ q · s, |q| ≤ 448 with the block maximum on it, zero blocks harmless."""
    torch.manual_seed(4)
    w = torch.randn(130, 260) * torch.logspace(-3, 1, 260)
    w[:128, 128:256] = 0.0
    q, s = weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (2, 3)
    assert not q.float().isnan().any() and q.float().abs().max() == 448
    assert s[0, 1] == 1.0 and weight_dequant(q, s)[:128, 128:256].abs().max() == 0
    back = weight_dequant(q, s)
    assert ((back - w).abs() <= 2.0**-4 * back.abs().clamp(min=s.max() * 2.0**-6)).all()


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    model = random_model()
    save_pretrained(model, tmp_path)
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"missing key {key} \(expected shape \[64, 32\]\)"):
        load_pretrained(tmp_path)

    save_pretrained(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(3, 5)}))
    with pytest.raises(ValueError, match=r"unexpected key model\.layers\.0\.mlp\.extra\.weight \(shape \[3, 5\]\)"):  # fmt: skip
        load_pretrained(tmp_path)

    save_pretrained(model, tmp_path)
    _rewrite(tmp_path, lambda t: t.update({key: torch.ones(64, 31)}))
    with pytest.raises(ValueError, match=rf"{key}: expected shape \[64, 32\], found \[64, 31\]"):
        load_pretrained(tmp_path)


def test_mtp_layer_beyond_the_config_is_unexpected(tmp_path):
    save_pretrained(random_model(num_nextn_predict_layers=2), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with pytest.raises(ValueError, match=r"unexpected key model\.layers\.3\.enorm\.weight"):
        load_pretrained(tmp_path)


def test_checkpoint_without_mtp_weights_loads_the_main_model(tmp_path):
    """transformers' save_pretrained drops the MTP layer: the main model loads, with a warning,
    or require_mtp refuses it."""
    model = random_model()
    save_pretrained(model, tmp_path)
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.")])
    with pytest.warns(UserWarning, match=r"no MTP weights \(model\.layers\.2\.\*\).*speculative"):
        loaded = load_pretrained(tmp_path)
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.model.mtp) == 0
    ids = _ids(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"holds no MTP weights \(model\.layers\.2\.\*\)"):
        load_pretrained(tmp_path, require_mtp=True)


def test_partial_mtp_layer_is_named_as_missing(tmp_path):
    save_pretrained(random_model(), tmp_path)
    key = "model.layers.2.eh_proj.weight"
    _rewrite(tmp_path, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"missing key {key} \(expected shape \[64, 128\]\)"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("copy", ["embed_tokens.weight", "shared_head.head.weight"])
def test_mtp_copy_that_differs_is_refused(copy, tmp_path):
    save_pretrained(random_model(), tmp_path)
    key = f"model.layers.2.{copy}"
    _rewrite(tmp_path, lambda t: t[key].add_(1e-3))
    with pytest.raises(ValueError, match=rf"{key} differs from"):
        load_pretrained(tmp_path)


def test_fp8_errors_name_the_field_or_key(tmp_path):
    save_pretrained(random_model(), tmp_path, fp8=True)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization_config\.weight_block_size"):
        load_pretrained(tmp_path)

    del config["quantization_config"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"self_attn\.o_proj\.weight is stored in FP8"):
        load_pretrained(tmp_path)


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_pretrained(tmp_path)


def test_write_is_atomic(tmp_path, monkeypatch):
    """A writer that dies on the second shard leaves the old checkpoint intact and no debris."""
    path = tmp_path / "ckpt"
    old = random_model(seed=5)
    save_pretrained(old, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_save, calls = safetensors.torch.save_file, []

    def dying_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(seed=6), path, max_shard_size=64 * 1024)
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    _assert_same_state(old, load_pretrained(path))


def test_overwrite_replaces_weights_and_keeps_other_files(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(random_model(seed=5), path, max_shard_size=64 * 1024)
    (path / "tokenizer.json").write_text("{}")
    new = random_model(seed=6)
    save_pretrained(new, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", SINGLE_NAME, "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    _assert_same_state(new, load_pretrained(path))


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_pretrained(random_model(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tiny_preset_sharded_fp8_round_trip(tmp_path):
    """The course's preset, sharded and FP8 at once: loads, and decodes like the original."""
    torch.manual_seed(7)
    model = DeepSeekV3(preset("tiny")).eval()
    save_pretrained(model, tmp_path, fp8=True, max_shard_size="1MB")
    loaded = load_pretrained(tmp_path)
    ids = _ids(model)
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 0.1
