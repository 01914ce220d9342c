"""ModelConfig: presets, config.json round trips in both spellings, and clear errors."""

import json

import pytest

from dsv3lite import ModelConfig, preset
from dsv3lite.config import PRESETS


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
