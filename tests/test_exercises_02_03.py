"""The exercises added to notebooks 02 and 03: the reference solutions pass, the usual
mistakes are caught with a message that names them, and a stub is reported as not done."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from dsv3lite.exercises import ExerciseError
from dsv3lite.exercises.moe import check_max_violation
from dsv3lite.exercises.mtp import check_mtp_loss
from dsv3lite.exercises.solutions import max_violation, mtp_loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_solutions_pass(seed, capsys):
    check_max_violation(max_violation, seed=seed)
    check_mtp_loss(mtp_loss, seed=seed)
    out = capsys.readouterr().out
    assert out.count("✓ correct") == 2


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda load: load.float().max() / load.float().mean(), "without the − 1"),
        (lambda load: load.float().max() / load.float().sum() - 1, "total load"),
        (lambda load: load.max() / load.mean() - 1, "raised RuntimeError"),  # integer mean
    ],
)
def test_max_violation_mistakes(wrong, words):
    with pytest.raises(ExerciseError, match=words) as err:
        check_max_violation(wrong, seed=0)
    assert err.value.hint and "float" in err.value.hint


@pytest.mark.parametrize(
    "wrong, words",
    [
        (
            lambda lg, y, k: F.cross_entropy(lg.flatten(0, 1), y[:, : y.shape[1] - k].flatten()),
            "main head's targets",
        ),  # fmt: skip
        (
            lambda lg, y, k: (
                F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten(), reduction="sum") / y.numel()
            ),
            "divided by T",
        ),  # fmt: skip
        (
            lambda lg, y, k: F.cross_entropy(
                lg.flatten(0, 1), y[:, k - 1 : y.shape[1] - 1].flatten()
            ),
            "main head's|off by one",
        ),  # fmt: skip
    ],
)
def test_mtp_loss_mistakes(wrong, words):
    with pytest.raises(ExerciseError, match=words):
        check_mtp_loss(wrong, seed=0)


def test_stubs_are_not_done_yet(capsys):
    def my_max_violation(load): ...

    def my_mtp_loss(mtp_logits, labels, k): ...

    check_max_violation(my_max_violation)
    check_mtp_loss(my_mtp_loss)
    out = capsys.readouterr().out
    assert out.count("not done yet") == 2 and "my_mtp_loss" in out


def test_a_loss_per_position_is_named():
    def per_position(lg, y, k):
        return F.cross_entropy(lg.transpose(1, 2), y[:, k:], reduction="none")

    with pytest.raises(ExerciseError, match="one number"):
        check_mtp_loss(per_position, seed=0)
