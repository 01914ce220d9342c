"""Parity with transformers' DeepseekV3ForCausalLM through checkpoints, in both directions.

transformers writes a checkpoint, we load it and must give its logits (fp32, eager attention);
we write one (plain or FP8) and transformers must load it and agree. transformers' router
masks dropped groups with -inf, as ours does, so a non-zero e_score_correction_bias is fair game.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from dsv3lite import DeepSeekV3, ModelConfig, load_pretrained, save_pretrained  # noqa: E402
from dsv3lite.checkpoint import SCALE_SUFFIX, release_state_dict  # noqa: E402
from dsv3lite.fp8 import weight_dequant  # noqa: E402

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,  # transformers' default is 128 whatever the head count
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    rope_interleave=True,
    max_position_embeddings=128,
    num_mtp_layers=0,  # transformers builds no MTP module and saves none
    initializer_range=0.05,  # large enough for peaked attention and spread router scores
)
YARN = {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip

CASES = {
    "base": {},
    "no-q-lora": {"q_lora_rank": None},
    "one-group-two-shared": {"n_group": 1, "topk_group": 1, "n_shared_experts": 2},
    "all-moe": {"first_k_dense_replace": 0},
    "unnormalised-topk": {"norm_topk_prob": False},
    "half-split-rope": {"rope_interleave": False},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, **YARN}},
    "yarn-half-split-no-q-lora": {
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **YARN},
        "rope_interleave": False,
        "q_lora_rank": None,
    },
    "tied": {"tie_word_embeddings": True},
}


def _hf_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """A random transformers model with non-trivial norms and a non-zero router bias."""
    torch.manual_seed(seed)
    config = DeepseekV3Config(**{**TINY, **overrides}, attn_implementation="eager")
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def _hf_load(path) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _assert_same_logits(ours: DeepSeekV3, hf: DeepseekV3ForCausalLM, seed: int = 1) -> None:
    """max |Δ| ≤ 1e-5 · max(1, max|ref|) and ‖Δ‖/‖ref‖ ≤ 1e-5, for both MLA paths."""
    torch.manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        for impl in ("naive", "absorb"):
            ours.attn_impl = impl
            out = ours(ids).logits
            scale = max(1.0, ref.abs().max().item())
            assert (out - ref).abs().max().item() <= 1e-5 * scale, impl
            assert ((out - ref).norm() / ref.norm()).item() <= 1e-5, impl
    assert ref.std() > 0.1  # the comparison is not between near-constant logits


@pytest.mark.parametrize("case", CASES)
def test_loads_transformers_checkpoint(case, tmp_path):
    hf = _hf_model(**CASES[case])
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.num_nextn_predict_layers == 0
    _assert_same_logits(ours, hf)


def test_release_rope_spelling_reads_the_same_in_both_libraries(tmp_path):
    """The release writes rope_theta + rope_scaling {"type": "yarn"}; transformers 5 writes
    rope_parameters. Rewrite config.json the release's way; both libraries must still agree."""
    hf = _hf_model(rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, **YARN})
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=5000.0, rope_scaling={"type": "yarn", **YARN})
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, hf_again = load_pretrained(tmp_path), _hf_load(tmp_path)
    assert ours.config.rope_theta == 5000.0
    assert ours.config.rope_scaling["factor"] == 4.0
    _assert_same_logits(ours, hf_again)
    _assert_same_logits(ours, hf)  # transformers read the release spelling as it wrote its own


@pytest.mark.parametrize("mtp", [0, 1])
def test_transformers_loads_our_checkpoint(mtp, tmp_path):
    """Our save_pretrained → transformers' from_pretrained: nothing missing, same logits. With an
    MTP module, transformers skips its layer (model.layers.L.*) and needs nothing else."""
    hf_config = {
        k: v for k, v in TINY.items() if k not in ("num_mtp_layers", "num_key_value_heads")
    }
    config = ModelConfig(**hf_config, num_nextn_predict_layers=mtp)
    torch.manual_seed(3)
    ours = DeepSeekV3(config).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    save_pretrained(ours, tmp_path)
    hf, info = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"]
    mtp_layer = f"model.layers.{config.num_hidden_layers}."
    assert all(key.startswith(mtp_layer) for key in info["unexpected_keys"])
    assert bool(info["unexpected_keys"]) == bool(mtp)
    _assert_same_logits(ours, hf.eval())


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path):
    """transformers' checkpoint → ours → FP8 checkpoint → ours again: the weights are exactly
    the dequantized FP8 values, and transformers given those same weights agrees to fp32."""
    hf = _hf_model(seed=4, first_k_dense_replace=0)
    hf.save_pretrained(tmp_path / "hf")
    save_pretrained(load_pretrained(tmp_path / "hf"), tmp_path / "fp8", fp8=True)
    ours = load_pretrained(tmp_path / "fp8")

    from safetensors.torch import load_file

    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    state = release_state_dict(ours)  # the experts one by one, as the files hold them
    fp8_keys = [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8_keys) > 3 * 5
    for key in fp8_keys:
        expected = weight_dequant(stored[key], stored[key + SCALE_SUFFIX])
        assert torch.equal(state[key], expected), key

    save_pretrained(ours, tmp_path / "dequantized")
    _assert_same_logits(ours, _hf_load(tmp_path / "dequantized"))


def test_transformers_dequantizes_our_fp8_checkpoint_as_we_do(tmp_path):
    """transformers' own FP8 loader (dequantize=True, which needs accelerate) reads our FP8 files
    to the same model. Every dimension here is below 128 on purpose: transformers 5.24 derives
    the block size from the scale grid (rows // scale_rows), which misplaces the scales of a
    partial edge block; our loader keeps 128 (see test_checkpoint's ragged test)."""
    pytest.importorskip("accelerate")
    from transformers import FineGrainedFP8Config

    hf = _hf_model(seed=5, first_k_dense_replace=0)
    hf.save_pretrained(tmp_path / "hf")
    save_pretrained(load_pretrained(tmp_path / "hf"), tmp_path / "fp8", fp8=True)
    hf8 = DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "fp8",
        attn_implementation="eager",
        dtype=torch.float32,
        quantization_config=FineGrainedFP8Config(dequantize=True),
    )
    _assert_same_logits(load_pretrained(tmp_path / "fp8"), hf8.eval())
