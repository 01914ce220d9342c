"""DeepSeek's inference format: round trips (mp 1 and 2, FP8, MTP), the ranks' cuts, the ModelArgs
JSON, group scoring by max without a gate bias, and the errors a user meets."""

import json
import subprocess
import sys

import pytest
import torch
from models import random_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3lite import DeepSeekV3, ModelConfig, load_pretrained, preset, save_pretrained
from dsv3lite.convert import (
    ARGS_NAME,
    config_from_args,
    official_args,
    release_name,
    to_hf,
    to_official,
)
from dsv3lite.errors import UserInputError

# every dim that is cut across 2 ranks is a multiple of 2 × 128, so FP8 blocks are not split
FP8_SHAPES = dict(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                  qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  max_position_embeddings=64)  # fmt: skip


def _tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``folder`` (keys are unique in the release)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key  # FP8 too


def _logits(model: DeepSeekV3, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        out = model(ids, mtp=True)
        return out.logits, out.mtp_logits


@pytest.mark.parametrize(
    "mp, overrides",
    [(1, {}), (2, {}), (2, {"q_lora_rank": None, "num_nextn_predict_layers": 2})],
    ids=["mp1", "mp2", "mp2-no-q-lora-mtp2"],
)
def test_round_trip_is_exact(mp, overrides, tmp_path):
    model = random_model(**overrides)
    save_pretrained(model, tmp_path / "hf")
    to_official(tmp_path / "hf", tmp_path / "official", mp=mp)
    files = {p.name for p in (tmp_path / "official").iterdir()}
    ranks = {f"{kind}{i}-mp{mp}.safetensors" for kind in ("model", "mtp") for i in range(mp)}
    assert files == ranks | {ARGS_NAME}
    to_hf(tmp_path / "official", tmp_path / "back")
    _assert_identical(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))
    assert ModelConfig.load(tmp_path / "back") == model.config
    logits, mtp = _logits(model)
    logits2, mtp2 = _logits(load_pretrained(tmp_path / "back"))
    assert torch.equal(logits, logits2)
    assert len(mtp2) == len(mtp) and all(torch.equal(x, y) for x, y in zip(mtp, mtp2))


@pytest.mark.parametrize("mp", [1, 2])
def test_fp8_round_trip_keeps_the_bytes(mp, tmp_path):
    model = random_model(seed=2, **FP8_SHAPES)
    save_pretrained(model, tmp_path / "hf", fp8=True)
    to_official(tmp_path / "hf", tmp_path / "official", mp=mp)
    args = json.loads((tmp_path / "official" / ARGS_NAME).read_text())
    assert args["dtype"] == "fp8"
    with safe_open(tmp_path / "official" / f"model0-mp{mp}.safetensors", "pt") as f:
        q, s = f.get_tensor("layers.0.attn.wq_b.weight"), f.get_tensor("layers.0.attn.wq_b.scale")
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert list(s.shape) == [4 // mp, 1] and list(q.shape) == [512 // mp, 64]
    to_hf(tmp_path / "official", tmp_path / "back")
    _assert_identical(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    logits, _ = _logits(load_pretrained(tmp_path / "hf"))
    assert torch.equal(logits, _logits(load_pretrained(tmp_path / "back"))[0])


def test_fp8_cut_inside_a_scale_block_is_refused(tmp_path):
    save_pretrained(random_model(), tmp_path / "hf", fp8=True)
    with pytest.raises(UserInputError, match=r"q_b_proj.weight is FP8 .* 128-wide scale blocks"):
        to_official(tmp_path / "hf", tmp_path / "official", mp=2)
    assert not (tmp_path / "official").exists()


# the cuts of DeepSeek's inference/model.py, by release module: column-parallel along dim 0
# (the vocabulary for embed and head), row-parallel along dim 1, routed experts whole by index
_COLUMN = ("embed_tokens", "lm_head", "head", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


def test_ranks_hold_their_cuts(tmp_path):
    model = random_model()
    save_pretrained(model, tmp_path / "hf")
    to_official(tmp_path / "hf", tmp_path / "official", mp=2)
    official = tmp_path / "official"
    ranks = [
        load_file(official / f"model{r}-mp2.safetensors")
        | load_file(official / f"mtp{r}-mp2.safetensors")
        for r in range(2)
    ]
    assert sorted(k for k in ranks[0] if k.startswith("layers.0.")) == sorted(
        f"layers.0.{name}.weight"
        for name in (
            "attn_norm",
            "ffn_norm",
            "attn.wq_a",
            "attn.q_norm",
            "attn.wq_b",
            "attn.wkv_a",
            "attn.kv_norm",
            "attn.wkv_b",
            "attn.wo",
            "ffn.w1",
            "ffn.w2",
            "ffn.w3",
        )  # fmt: skip
    )
    assert {"embed.weight", "norm.weight", "head.weight", "layers.1.ffn.gate.bias"} <= set(ranks[0])
    assert {"layers.2.enorm.weight", "layers.2.eh_proj.weight", "layers.2.embed.weight"} <= set(
        ranks[1]
    )
    hf = _tensors(tmp_path / "hf")
    seen = set()
    for r, rank in enumerate(ranks):
        for key, part in rank.items():
            name = release_name(key)
            full, module = hf[name], name.split(".")[-2]
            seen.add(name)
            if ".experts." in name and ".shared_experts." not in name:
                assert int(name.split(".")[-3]) // 4 == r, key  # 8 experts, 4 a rank
                assert torch.equal(part, full), key
            elif module in _COLUMN or module in _ROW:
                dim = 0 if module in _COLUMN else 1
                assert torch.equal(part, full.chunk(2, dim=dim)[r]), key
            else:
                assert torch.equal(part, full), key
    assert seen == set(hf)
    assert ranks[0]["layers.0.attn.wo.weight"].shape == (64, 16)  # 2 heads × 16 / 2 ranks


def test_a_checkpoint_without_its_mtp_layer_converts(tmp_path):
    """transformers writes no MTP layer but keeps num_nextn_predict_layers=1 in config.json."""
    save_pretrained(random_model(num_nextn_predict_layers=0), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps(config | {"num_nextn_predict_layers": 1})
    )
    to_official(tmp_path / "hf", tmp_path / "official", mp=2)
    assert not list((tmp_path / "official").glob("mtp*"))
    to_hf(tmp_path / "official", tmp_path / "back")
    assert ModelConfig.load(tmp_path / "back").num_nextn_predict_layers == 0
    _assert_identical(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))


def _strip_biases(folder) -> None:
    """Make the folder look like DeepSeek's non-671B checkpoints: gates without a bias."""
    for path in folder.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(path).items() if not k.endswith("gate.bias")}
        save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("n_group, rule", [(4, "max"), (1, "top2_sum")])
def test_official_gates_without_bias_route_by_max(n_group, rule, tmp_path):
    model = random_model(n_group=n_group, topk_group=min(n_group, 2))
    save_pretrained(model, tmp_path / "hf")
    to_official(tmp_path / "hf", tmp_path / "official", mp=2)
    _strip_biases(tmp_path / "official")
    to_hf(tmp_path / "official", tmp_path / "back")
    back = load_pretrained(tmp_path / "back")
    assert back.config.group_score == rule
    assert all(not moe.gate.e_score_correction_bias.any() for moe in back.moe_layers())
    # and back again: the inference format without biases, as it came
    to_official(tmp_path / "back", tmp_path / "again", mp=2)
    gate_biases = [k for k in _tensors(tmp_path / "again") if k.endswith("gate.bias")]
    assert (gate_biases == []) == (rule == "max")


def test_group_score_max_with_a_bias_is_refused(tmp_path):
    model = random_model()
    model.config = model.config.replace(group_score="max")
    save_pretrained(model, tmp_path / "hf")
    with pytest.raises(UserInputError, match="e_score_correction_bias is not zero"):
        to_official(tmp_path / "hf", tmp_path / "official")


def test_model_args_of_deepseeks_configs():
    """DeepSeek's configs/config_671B.json and config_16B.json, with ModelArgs' defaults."""
    v3 = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048,
          "n_layers": 61, "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256,
          "n_shared_experts": 1, "n_activated_experts": 8, "n_expert_groups": 8,
          "n_limited_groups": 4, "route_scale": 2.5, "score_func": "sigmoid", "q_lora_rank": 1536,
          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "dtype": "fp8"}  # fmt: skip
    config = config_from_args(v3, gate_bias=True)
    assert config == preset("v3-671b", max_position_embeddings=16384, num_nextn_predict_layers=0)
    lite = {"vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408,
            "n_layers": 27, "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64,
            "n_shared_experts": 2, "n_activated_experts": 6, "route_scale": 1.0, "q_lora_rank": 0,
            "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "mscale": 0.707}  # fmt: skip
    config = config_from_args(lite, gate_bias=False)
    assert (config.scoring_func, config.norm_topk_prob, config.n_group) == ("softmax", False, 1)
    assert config.q_lora_rank is None and config.group_score == "top2_sum"
    assert config.rope_scaling["mscale"] == config.rope_scaling["mscale_all_dim"] == 0.707
    args = official_args(config, fp8=False)
    assert config_from_args(args, gate_bias=False) == config
    with pytest.raises(UserInputError, match=r"ModelArgs has no fields \['n_experts'\]"):
        config_from_args({**lite, "n_experts": 64}, gate_bias=False)


def test_configs_the_inference_code_cannot_run_are_refused(tmp_path):
    save_pretrained(random_model(rms_norm_eps=1e-5), tmp_path / "hf")
    with pytest.raises(UserInputError, match="rms_norm_eps=1e-05"):
        to_official(tmp_path / "hf", tmp_path / "official")


def test_loading_the_inference_format_says_how_to_convert(tmp_path):
    save_pretrained(random_model(), tmp_path / "hf")
    to_official(tmp_path / "hf", tmp_path / "official", mp=2)
    command = f"python -m dsv3lite convert {tmp_path / 'official'} {tmp_path / 'official'}-hf"
    with pytest.raises(UserInputError, match="DeepSeek's inference format") as err:
        load_pretrained(tmp_path / "official")
    assert f"{command} --to hf" in str(err.value) and "--config" not in str(err.value)
    (tmp_path / "official" / ARGS_NAME).unlink()  # as DeepSeek's own convert.py leaves it
    with pytest.raises(UserInputError, match="--config ARGS.json"):
        load_pretrained(tmp_path / "official")
    with pytest.raises(UserInputError, match="pass DeepSeek's ModelArgs JSON with --config"):
        to_hf(tmp_path / "official", tmp_path / "back")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3lite", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_converts_both_ways(tmp_path):
    model = random_model()
    save_pretrained(model, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    done = _cli(tmp_path / "hf", tmp_path / "official", "--to", "official", "--mp", "2")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "official" / "tokenizer.json").exists()
    args = tmp_path / "args.json"
    (tmp_path / "official" / ARGS_NAME).rename(args)
    done = _cli(tmp_path / "official", tmp_path / "back", "--to", "hf", "--config", args)
    assert done.returncode == 0, done.stderr
    _assert_identical(_tensors(tmp_path / "hf"), _tensors(tmp_path / "back"))
    done = _cli(tmp_path / "official", tmp_path / "x", "--to", "official")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "looks like DeepSeek's inference format" in done.stderr
    done = _cli(tmp_path / "hf", tmp_path / "x", "--to", "hf")
    assert done.returncode == 2 and "is not in DeepSeek's inference format" in done.stderr
