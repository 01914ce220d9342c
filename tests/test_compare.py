"""Runs side by side: same seed and data for every balancing mode; the tail-mean summary."""

import pytest

from dsv3lite.train import TrainConfig
from dsv3lite.train.compare import THREE_WAYS, tail_mean, train_three_ways

FAST = dict(batch_size=4, seq_len=32, log_every=1, eval_every=3, eval_batches=1, progress=False)


def test_three_ways_share_seed_and_data_but_not_the_rule(tmp_path):
    base = TrainConfig(steps=3, ckpt_every=3, out="ignored", alpha=0.1, gamma=0.1, **FAST)
    runs = train_three_ways(base, tmp_path)
    assert tuple(runs) == THREE_WAYS
    for mode, rows in runs.items():
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert (tmp_path / mode / "final" / "config.json").exists()
        assert ("balance_loss" in rows[0]) == (mode == "aux-loss")
    # step 1's loss is computed before any update: identical weights and batch in every mode
    first = {mode: rows[0]["loss"] for mode, rows in runs.items()}
    assert len(set(first.values())) == 1, first
    # after it, the rules act: the aux-free bias (γ = 0.1) moves the routing
    assert runs["aux-free"][2]["expert_load"] != runs["none"][2]["expert_load"]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="allowed"):
        train_three_ways(TrainConfig(**FAST), tmp_path, modes=("none", "sometimes"))


def test_tail_mean():
    rows = [{"maxvio": v} for v in (4.0, 3.0, 2.0, 1.0)] + [{"other": 0.0}]
    assert tail_mean(rows, "maxvio") == pytest.approx(1.5)
    assert tail_mean(rows, "maxvio", fraction=1.0) == pytest.approx(2.5)
    assert tail_mean(rows, "maxvio", fraction=0.1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fraction"):
        tail_mean(rows, "maxvio", fraction=0.0)
    with pytest.raises(ValueError, match="no row"):
        tail_mean(rows, "val_loss")
