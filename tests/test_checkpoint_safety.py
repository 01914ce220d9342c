"""Loading what users hand us: bad indexes, broken shards, odd tensors, transformers' files;
and save_pretrained under a kill at every file operation."""

import json
import shutil

import pytest
import torch
from crash import Kill, Killed
from models import random_model
from safetensors.torch import save_file
from test_checkpoint import _rewrite

from dsv3lite import load_pretrained, save_pretrained
from dsv3lite.checkpoint import INDEX_NAME, SINGLE_NAME

KEY = "model.layers.1.self_attn.kv_b_proj.weight"  # [64, 32]


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(random_model(), path)
    return path


@pytest.fixture
def sharded(tmp_path):
    path = tmp_path / "sharded"
    save_pretrained(random_model(), path, max_shard_size=64 * 1024)
    return path


def _edit_index(path, change) -> None:
    index = json.loads((path / INDEX_NAME).read_text())
    change(index)
    (path / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""]
)
def test_index_entries_outside_the_folder_are_refused(name, sharded):
    save_file({KEY: torch.randn(64, 32)}, sharded.parent / "outside.safetensors")
    _edit_index(sharded, lambda index: index["weight_map"].update({KEY: name}))
    with pytest.raises(ValueError) as err:
        load_pretrained(sharded)
    message = str(err.value)
    assert str(sharded / INDEX_NAME) in message and KEY in message and repr(name) in message


@pytest.mark.parametrize("text", ["[]", '{"metadata": {}}', '{"weight_map": [1]}', "{not json"])
def test_an_index_without_a_weight_map_is_named(text, sharded):
    (sharded / INDEX_NAME).write_text(text)
    with pytest.raises(ValueError, match=rf"{INDEX_NAME} (has no weight_map|is not valid JSON)"):
        load_pretrained(sharded)


def test_a_key_in_another_shard_than_the_index_says_is_named(sharded):
    index = json.loads((sharded / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(s for s in shards if s != index["weight_map"][KEY])
    _edit_index(sharded, lambda index: index["weight_map"].update({KEY: wrong}))
    with pytest.raises(ValueError, match=rf"weight_map puts {KEY} in {wrong}, which holds no such"):
        load_pretrained(sharded)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_shard_is_named(damage, ckpt):
    file = ckpt / SINGLE_NAME
    data = file.read_bytes()
    file.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 9, "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=rf"{file} is not a complete safetensors file"):
        load_pretrained(ckpt)


def test_a_missing_shard_is_named(sharded):
    index = json.loads((sharded / INDEX_NAME).read_text())
    (sharded / index["weight_map"][KEY]).unlink()
    with pytest.raises(FileNotFoundError, match=index["weight_map"][KEY]):
        load_pretrained(sharded)


def test_a_file_passed_for_the_folder_is_named(ckpt):
    with pytest.raises(ValueError, match=rf"{ckpt / SINGLE_NAME} is a file; pass the checkpoint"):
        load_pretrained(ckpt / SINGLE_NAME)


@pytest.mark.parametrize(
    ("tensor", "name"),
    [
        (torch.ones(64, 32, dtype=torch.int64), "I64"),
        (torch.ones(64, 32, dtype=torch.bool), "BOOL"),
    ],
)
def test_integer_and_bool_tensors_are_not_cast_into_weights(tensor, name, ckpt):
    _rewrite(ckpt, lambda t: t.update({KEY: tensor}))
    with pytest.raises(ValueError, match=rf"{KEY} is stored as {name}; weights must be floating"):
        load_pretrained(ckpt)


def test_a_misshaped_key_is_not_also_missing(ckpt):
    _rewrite(ckpt, lambda t: t.update({KEY: torch.ones(64, 31)}))
    with pytest.raises(ValueError, match=rf"{KEY}: expected shape \[64, 32\]") as err:
        load_pretrained(ckpt)
    assert "missing" not in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_are_named_unless_allowed(bad, ckpt):
    def poison(tensors):
        tensors[KEY][3, 4] = bad

    _rewrite(ckpt, poison)
    with pytest.raises(
        ValueError, match=rf"NaN or infinite values in 1 tensor\(s\): {KEY} \(allow_nonfinite"
    ):
        load_pretrained(ckpt)
    model = load_pretrained(ckpt, allow_nonfinite=True)
    assert not model.state_dict()[KEY].isfinite().all()


def test_a_nan_embedding_is_reported_as_nan_not_as_differing_from_its_mtp_copy(ckpt):
    def poison(tensors):
        for key in ("model.embed_tokens.weight", "model.layers.2.embed_tokens.weight"):
            tensors[key][5, 0] = float("nan")

    _rewrite(ckpt, poison)
    with pytest.raises(
        ValueError, match=r"NaN or infinite values in 1 tensor\(s\): model\.embed_tokens\.weight"
    ):
        load_pretrained(ckpt)
    assert load_pretrained(ckpt, allow_nonfinite=True)  # equal, NaN for NaN


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("torch.float16", torch.float16)],
)
def test_dtype_by_name(name, dtype, ckpt):
    assert load_pretrained(ckpt, dtype=name).lm_head.weight.dtype == dtype


@pytest.mark.parametrize("dtype", ["fp32", "int64", "float8_e4m3fn", torch.int8, 32])
def test_a_dtype_that_cannot_hold_weights_is_refused(dtype, ckpt):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, bfloat16, float16"):
        load_pretrained(ckpt, dtype=dtype)


def test_a_transformers_checkpoint_loads_without_its_mtp_module(tmp_path):
    """transformers' DeepseekV3Config says num_nextn_predict_layers=1, its save_pretrained
    writes no MTP layer: the main model loads, with one warning, and gives transformers' logits."""
    transformers = pytest.importorskip("transformers")
    from test_parity import TINY, _assert_same_logits

    config = {k: v for k, v in TINY.items() if k != "num_mtp_layers"}  # the default: 1
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**config, attn_implementation="eager")
    ).eval()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="no MTP weights") as warned:
        ours = load_pretrained(tmp_path)
    assert len([w for w in warned if "MTP" in str(w.message)]) == 1
    assert ours.config.num_nextn_predict_layers == 0
    _assert_same_logits(ours, hf)
    with pytest.raises(ValueError, match=r"holds no MTP weights \(model\.layers\.3\.\*\)"):
        load_pretrained(tmp_path, require_mtp=True)


def test_a_kill_at_any_file_operation_of_save_pretrained_loses_nothing(tmp_path, monkeypatch):
    """Kill an overwrite at its 1st, 2nd, ... file operation (before it, then after it). The
    folder holds the old checkpoint or the new one, or, killed between the two renames, nothing
    while the old one waits aside; the next save restores it first and leaves no debris."""
    old, new = random_model(seed=5), random_model(seed=6)
    states = [old.state_dict(), new.state_dict()]
    template = tmp_path / "template"
    save_pretrained(old, template, max_shard_size=64 * 1024)
    (template / "tokenizer.json").write_text("{}")  # a file of the user's, carried over
    for after in (False, True):
        for at in range(1, 200):
            path = tmp_path / f"{after}-{at}" / "ckpt"
            shutil.copytree(template, path)
            kill = Kill(at, after)
            with monkeypatch.context() as mp:
                kill.install(mp)
                try:
                    save_pretrained(new, path)
                except Killed:
                    pass
            where = f"killed {'after' if after else 'before'} file operation {at}"
            if path.exists():
                loaded = load_pretrained(path).state_dict()
                assert any(all(loaded[k].equal(t) for k, t in m.items()) for m in states), where
            else:
                assert (path.parent / ".ckpt.old" / "config.json").exists(), where
            save_pretrained(new, path)
            assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"], where
            assert (path / "tokenizer.json").read_text() == "{}", where
            assert torch.equal(load_pretrained(path).state_dict()[KEY], new.state_dict()[KEY])
            if not kill.fired:
                break
        assert at > 10, "save_pretrained has fewer file operations than expected"
