"""Balancing: the bias rule, the sequence-wise loss (eqs. 17–20) and MaxVio against formulas."""

import torch

from dsv3lite import preset
from dsv3lite.model import sequence_balance_loss
from dsv3lite.model.moe import MoE, Routing
from dsv3lite.train.balance import max_violation, update_bias


def test_bias_moves_by_gamma_towards_the_mean_load():
    torch.manual_seed(0)
    moe = MoE(preset("tiny"))
    start = torch.randn(16) * 0.01
    moe.gate.e_score_correction_bias.copy_(start)
    load = torch.randint(0, 50, (16,))
    update_bias([moe], [load], gamma=0.01)
    expected = start + 0.01 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)


def test_sequence_balance_loss_matches_eqs_17_to_20():
    torch.manual_seed(1)
    b, t, n, k, alpha = 3, 7, 8, 2, 0.01
    scores = torch.rand(b * t, n, dtype=torch.float64)
    indices = torch.stack([torch.randperm(n)[:k] for _ in range(b * t)])
    routing = Routing(weights=None, indices=indices, scores=scores, load=None)
    got = sequence_balance_loss(routing, b, alpha)
    ref = 0.0
    for seq in range(b):
        rows = range(seq * t, (seq + 1) * t)
        f = [n / (k * t) * sum(int(i in indices[r].tolist()) for r in rows) for i in range(n)]
        p = [sum(float(scores[r, i] / scores[r].sum()) for r in rows) / t for i in range(n)]
        ref += alpha * sum(fi * pi for fi, pi in zip(f, p))
    torch.testing.assert_close(got, torch.tensor(ref / b, dtype=torch.float64))


def test_balanced_routing_gives_alpha():
    """Perfect balance and uniform affinities: f_i = 1, P_i = 1/N_r, so L_Bal = α."""
    n, k, t = 8, 2, 8
    indices = torch.arange(n).view(t, k) if t * k == n else torch.arange(t * k).view(t, k) % n
    scores = torch.full((t, n), 0.5)
    routing = Routing(weights=None, indices=indices, scores=scores, load=None)
    torch.testing.assert_close(sequence_balance_loss(routing, 1, 0.1), torch.tensor(0.1))


def test_max_violation():
    assert max_violation(torch.tensor([10, 10, 10, 10])) == 0.0
    assert abs(max_violation(torch.tensor([40, 0, 0, 0])) - 3.0) < 1e-6
    assert abs(max_violation(torch.tensor([3, 1, 2, 2])) - 0.5) < 1e-6
