"""The numerics helpers land where the report and the formats say: E4M3/E5M2 properties,
fine-grained scales against outliers, and the ~2% error of a 14-bit accumulator at K = 4096
that promotion every N_C = 128 removes (§3.3.2)."""

import pytest
import torch
from test_fp8_quant import one_thread  # noqa: F401 (an autouse fixture)

from dsv3lite.fp8 import numerics as nm
from dsv3lite.kernels import fp8_quant as fq


def test_format_properties():
    f = nm.fp8_formats()
    assert f["e4m3"] == pytest.approx(
        {"bits": 8, "exponent_bits": 4, "mantissa_bits": 3, "max": 448.0, "min_normal": 2.0**-6,
         "min_subnormal": 2.0**-9, "relative_spacing": 0.125, "binades": 17.807},
        rel=1e-4,
    )  # fmt: skip
    assert f["e5m2"] == pytest.approx(
        {"bits": 8, "exponent_bits": 5, "mantissa_bits": 2, "max": 57344.0, "min_normal": 2.0**-14,
         "min_subnormal": 2.0**-16, "relative_spacing": 0.25, "binades": 31.807},
        rel=1e-4,
    )  # fmt: skip


def test_fake_quant_is_what_the_kernels_compute():
    x = torch.randn(200, 300) * 3
    assert torch.equal(nm.fake_quant(x, "1x128"), fq.act_dequant(*fq.act_quant_ref(x)))
    assert torch.equal(nm.fake_quant(x, "128x128"), fq.weight_dequant(*fq.weight_quant_ref(x)))
    assert torch.equal(nm.fake_quant(x, "row"), nm.fake_quant(x, (1, None)))


def test_granularity_on_plain_and_outlier_activations():
    plain = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    for g in nm.GRANULARITIES:  # no outliers: E4M3's ~2.6%, whatever the grouping
        assert 0.02 < nm.quant_error(plain, g) < 0.03
    assert 0.045 < nm.quant_error(plain, "1x128", nm.E5M2) < 0.06  # one mantissa bit less

    x, outliers = nm.outlier_activations(512, 512)
    ordinary = torch.ones(512, dtype=torch.bool)
    ordinary[outliers] = False
    err = {g: nm.quant_error(x, g, where=ordinary) for g in nm.GRANULARITIES}
    assert err["tensor"] > 0.1  # the outliers' scale flushes the rest toward zero
    assert err["1x128"] < 0.03 and err["row"] < 0.035
    assert err["tensor"] > err["128x128"] > err["1x128"]
    assert x[:, outliers].abs().mean() > 1000 * x[:, ordinary].abs().mean()


def test_truncate_bits():
    x = torch.tensor(
        [1 + 2.0**-13, 1 + 2.0**-14, -(3 + 2.0**-13), 0.0, 2.0**-30 * (2 - 2.0**-20)],
        dtype=torch.float64,
    )
    out = nm.truncate_bits(x, 14)
    expected = [1 + 2.0**-13, 1.0, -3.0, 0.0, 2.0**-30 * (2 - 2.0**-13)]
    assert out.tolist() == expected


def test_limited_accumulation_error_and_promotion():
    """The report's figures: ~2% maximum relative error at K = 4096 with ~14 bits, far less
    with promotion every 128; a float32-like accumulator (24 bits) is exact to ~1e-6."""
    limited = nm.accumulation_error(4096, trials=300)
    promoted = nm.accumulation_error(4096, trials=300, n_c=128)
    assert 0.01 < limited < 0.04
    assert promoted < 1e-3 and promoted < limited / 20
    assert nm.accumulation_error(4096, trials=300, bits=24) < 1e-5
    shorter = nm.accumulation_error(1024, trials=300)
    assert 0.15 < shorter / limited < 0.4  # it grows about linearly with K


def test_limited_dot_with_enough_bits_is_exact():
    a = torch.rand(5, 256).to(nm.E4M3)
    b = torch.rand(5, 256).to(nm.E4M3)
    exact = (a.double() * b.double()).sum(1)
    assert torch.equal(nm.limited_dot(a, b, bits=53), exact)
    assert torch.allclose(nm.limited_dot(a, b, bits=53, n_c=128), exact, rtol=1e-6)
