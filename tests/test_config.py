"""ModelConfig: presets, config.json round trips in both spellings, and clear errors."""

import json
import warnings

import pytest

from dsv3lite import ModelConfig, preset
from dsv3lite.config import PRESETS
from dsv3lite.errors import UserInputError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_config_json(name, tmp_path):
    config = preset(name)
    config.save(tmp_path)
    assert ModelConfig.load(tmp_path) == config


def test_release_and_transformers_rope_spellings_agree():
    yarn = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
    release = ModelConfig.from_dict(
        {**PRESETS["tiny"], "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", **yarn}}
    )
    hf5 = ModelConfig.from_dict(
        {**PRESETS["tiny"], "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}}
    )
    assert release.rope_scaling == hf5.rope_scaling
    assert release.rope_theta == hf5.rope_theta == 10000.0


def test_softmax_scale_takes_yarn_mscale_squared():
    config = preset("v3-671b")
    mscale = 0.1 * 1.0 * __import__("math").log(40) + 1.0
    assert config.softmax_scale == pytest.approx(192**-0.5 * mscale**2, rel=1e-12)
    assert preset("tiny").softmax_scale == pytest.approx(48**-0.5)


def test_unknown_keys_survive_a_round_trip(tmp_path):
    d = {**PRESETS["tiny"], "quantization_config": {"quant_method": "fp8"}}
    config = ModelConfig.from_dict(d)
    config.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"] == {"quant_method": "fp8"}


def test_q_lora_rank_zero_means_no_compression():
    assert preset("tiny", q_lora_rank=0).q_lora_rank is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_routed_experts": 10, "n_group": 4}, "n_group"),
        ({"topk_group": 5, "n_group": 4}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # 2 kept groups × 4 experts = 8
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"hidden_size": -8}, "hidden_size"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **overrides)


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.load(tmp_path)


YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128}


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"n_group": None}, TypeError, "n_group"),
        ({"topk_group": "2"}, TypeError, "topk_group"),
        ({"num_experts_per_tok": 2.5}, TypeError, "num_experts_per_tok"),
        ({"vocab_size": "2048"}, TypeError, "vocab_size"),
        ({"hidden_size": True}, TypeError, "hidden_size"),
        ({"q_lora_rank": False}, TypeError, "q_lora_rank"),
        ({"n_shared_experts": None}, TypeError, "n_shared_experts"),
        ({"num_nextn_predict_layers": 1.0}, TypeError, "num_nextn_predict_layers"),
        ({"norm_topk_prob": 1}, TypeError, "norm_topk_prob"),
        ({"rope_interleave": "false"}, TypeError, "rope_interleave"),
        ({"tie_word_embeddings": None}, TypeError, "tie_word_embeddings"),
        ({"rope_theta": -10000.0}, ValueError, "rope_theta"),
        ({"rope_theta": float("nan")}, ValueError, "rope_theta"),
        ({"rope_theta": "1e4"}, TypeError, "rope_theta"),
        ({"rms_norm_eps": 0.0}, ValueError, "rms_norm_eps"),
        ({"rms_norm_eps": float("inf")}, ValueError, "rms_norm_eps"),
        ({"routed_scaling_factor": -2.5}, ValueError, "routed_scaling_factor"),
        ({"initializer_range": float("nan")}, ValueError, "initializer_range"),
        ({"bos_token_id": 2048}, ValueError, "bos_token_id"),  # tiny's vocab is 2048
        ({"eos_token_id": -1}, ValueError, "eos_token_id"),
        ({"eos_token_id": "</s>"}, TypeError, "eos_token_id"),
        ({"first_k_dense_replace": 5}, ValueError, "first_k_dense_replace"),  # 4 layers
        ({"rope_scaling": "yarn"}, TypeError, "rope_scaling"),
        ({"rope_scaling": {**YARN, "factor": 0}}, ValueError, "factor"),
        ({"rope_scaling": {**YARN, "factor": -4.0}}, ValueError, "factor"),
        ({"rope_scaling": {**YARN, "original_max_position_embeddings": 0}}, ValueError,
         "original_max_position_embeddings"),
        ({"rope_scaling": {**YARN, "beta_fast": 1, "beta_slow": 32}}, ValueError, "beta_fast"),
        ({"rope_scaling": {**YARN, "mscale": float("nan")}}, ValueError, "mscale"),
        ({"rope_scaling": {**YARN, "rope_type": "linear"}}, ValueError, "rope_type"),
    ],
)  # fmt: skip
def test_bad_values_name_the_field(overrides, error, field):
    """Each bad value is refused at construction with the right error type (ValueError for a bad
    value, TypeError for a bad type), and the message names the field."""
    with pytest.raises(error, match=field) as info:
        preset("tiny", **overrides)
    assert isinstance(info.value, UserInputError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[]", "JSON object"),
        (b"null", "JSON object"),
        (b'{"vocab_size": 2048,', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"hidden_size": "\xff\xfe"}', "not UTF-8"),
        (b'{"n_group": null}', "n_group"),
    ],
)
def test_bad_config_json_names_the_file(tmp_path, content, words):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=words) as info:
        ModelConfig.load(tmp_path)
    assert str(path) in str(info.value)


def test_transformers5_rope_parameters_with_both_type_keys():
    """transformers 5 writes rope_parameters holding rope_type *and* type; they must agree."""
    hf5 = {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, **YARN}
    config = ModelConfig.from_dict({**PRESETS["tiny"], "rope_parameters": hf5})
    assert config.rope_scaling == YARN
    with pytest.raises(ValueError, match="must agree"):
        ModelConfig.from_dict({**PRESETS["tiny"], "rope_parameters": {**hf5, "type": "linear"}})


def test_a_transformers_config_loads_without_warnings():
    from transformers import DeepseekV3Config

    tiny = PRESETS["tiny"]
    hf = DeepseekV3Config(
        **tiny, num_key_value_heads=tiny["num_attention_heads"], rope_scaling=dict(YARN)
    ).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ModelConfig.from_dict(hf)
    assert config.rope_scaling == YARN and config.hidden_size == tiny["hidden_size"]


def test_unknown_fields_are_named_in_one_warning():
    """DeepSeek's inference ModelArgs names (dim, n_layers) are not config.json's: say so."""
    with pytest.warns(UserWarning, match=r"\['dim', 'n_layers'\]"):
        config = ModelConfig.from_dict({**PRESETS["tiny"], "dim": 128, "n_layers": 4})
    assert config.extra == {"dim": 128, "n_layers": 4}


@pytest.mark.parametrize(("key", "value"), [("moe_layer_freq", 2), ("attention_bias", True)])
def test_settings_this_model_does_not_implement_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict({**PRESETS["tiny"], key: value})


def test_pad_token_id_in_range():
    with pytest.raises(ValueError, match="pad_token_id"):
        ModelConfig.from_dict({**PRESETS["tiny"], "pad_token_id": 99999})
