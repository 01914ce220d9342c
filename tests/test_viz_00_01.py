"""The diagrams of notebooks 00 and 01: each is a Figure with text a reader can read, and the
MLA picture's cache sizes are the ones the config gives (a wrong label fails here)."""

import re

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

import dsv3lite  # noqa: E402
from dsv3lite.accounting import kv_cache_bytes  # noqa: E402
from dsv3lite.viz import architecture_figure, mla_figure  # noqa: E402

CONFIGS = [
    dsv3lite.preset("v3-671b"),
    dsv3lite.preset("tiny"),
    # sizes that differ from every preset, so a hard-coded label shows
    dsv3lite.preset("tiny", num_attention_heads=6, kv_lora_rank=40, qk_rope_head_dim=8),
]


def _texts(fig: Figure):
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip()]


@pytest.mark.parametrize("draw", [architecture_figure, mla_figure])
@pytest.mark.parametrize("config", CONFIGS, ids=["671b", "tiny", "odd"])
def test_a_legible_figure(draw, config):
    fig = draw(config)
    assert isinstance(fig, Figure) and len(fig.axes) >= 1
    assert fig.dpi >= 100
    texts = _texts(fig)
    assert texts, "a diagram without labels"
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 9]
    assert not small, f"text under 9 pt: {small}"
    fig.canvas.draw()  # it renders (mathtext included)


def test_architecture_labels_come_from_the_config():
    config = CONFIGS[2]
    text = "\n".join(t.get_text() for t in _texts(architecture_figure(config)))
    for label in (
        f"L = {config.num_hidden_layers}",
        f"N_r = {config.n_routed_experts}",
        f"K_r = {config.num_experts_per_tok}",
        f"N_s = {config.n_shared_experts}",
    ):
        assert label in text, label


def _number(fig: Figure, gid: str, after: str) -> int:
    (label,) = [t.get_text() for t in _texts(fig) if t.get_gid() == gid]
    m = re.search(re.escape(after) + r"\s*([\d,]+) numbers", label)
    assert m, label
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("config", CONFIGS, ids=["671b", "tiny", "odd"])
def test_mla_cache_sizes_are_the_configs(config):
    fig = mla_figure(config)
    cb = kv_cache_bytes(config, bytes_per_value=1)
    mla = _number(fig, "cache_mla", "=")
    mha = _number(fig, "cache_mha", "=")
    assert mla == cb.mla == config.kv_lora_rank + config.qk_rope_head_dim
    assert mha == cb.mha
    mla_text = next(t.get_text() for t in _texts(fig) if t.get_gid() == "cache_mla")
    assert f"{2 * mla:,} B" in mla_text  # bf16 bytes
