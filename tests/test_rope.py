"""RoPE: the two layouts are one channel permutation apart; rotation is relative; YaRN ramps."""

import torch

from dsv3lite import preset
from dsv3lite.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq


def _tables(config, positions):
    return RotaryEmbedding(config)(positions)


def test_interleaved_equals_half_split_after_deinterleaving():
    config = preset("tiny")
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, config.qk_rope_head_dim)
    cos, sin = _tables(config, torch.arange(7))
    inter = apply_rope(x, cos, sin, interleave=True)
    deinterleave = lambda t: torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)  # noqa: E731
    half = apply_rope(deinterleave(x), cos, sin, interleave=False)
    torch.testing.assert_close(deinterleave(inter), half, rtol=0, atol=1e-6)


def test_scores_depend_only_on_relative_position():
    config = preset("tiny")
    torch.manual_seed(1)
    q, k = torch.randn(2, config.qk_rope_head_dim).double().unbind(0)
    for interleave in (True, False):
        cos, sin = _tables(config, torch.tensor([3, 10, 103, 110]))

        def rot(v, i, cos=cos, sin=sin, interleave=interleave):
            return apply_rope(v[None, None], cos[i : i + 1], sin[i : i + 1], interleave)[0, 0]

        a = rot(q, 1) @ rot(k, 0)  # positions 10 and 3
        b = rot(q, 3) @ rot(k, 2)  # positions 110 and 103
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_yarn_keeps_high_frequencies_and_divides_low_ones():
    factor = 8.0
    plain = preset("tiny")
    yarn = preset(
        "tiny",
        rope_scaling={"type": "yarn", "factor": factor, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )  # fmt: skip
    base, _ = rope_inv_freq(plain)
    scaled, attention_factor = rope_inv_freq(yarn)
    assert attention_factor == 1.0  # mscale == mscale_all_dim, as in the release
    torch.testing.assert_close(scaled[0], base[0])  # fastest rotation: extrapolated as is
    torch.testing.assert_close(scaled[-1], base[-1] / factor)  # slowest: interpolated
    ratio = base / scaled
    assert torch.all(ratio[1:] >= ratio[:-1] - 1e-6), "the ramp must be monotonic"
