"""The exercises added to notebooks 08–10: the reference solution passes, typical mistakes are
caught with a message that names them, and an untouched stub is reported as not done."""

from __future__ import annotations

import pytest
import torch

from dsv3lite.exercises import ExerciseError
from dsv3lite.exercises.inference import check_greedy_verify
from dsv3lite.exercises.solutions import greedy_verify


def test_the_solution_passes(capsys):
    for seed in (0, 1, 2, None):
        check_greedy_verify(greedy_verify, seed=seed)
    assert capsys.readouterr().out.count("✓ correct") == 4


def test_a_stub_is_not_done_yet(capsys):
    def my_greedy_verify(main_logits, draft): ...

    check_greedy_verify(my_greedy_verify)
    assert "not done yet" in capsys.readouterr().out


def forgets_the_bonus(main_logits, draft):
    choice = int(main_logits[0].argmax())
    return [draft] if choice == draft else [choice]


def verifies_with_row_1(main_logits, draft):
    if int(main_logits[1].argmax()) == draft:
        return [draft, int(main_logits[1].argmax())]
    return [int(main_logits[0].argmax())]


def keeps_both_rows(main_logits, draft):
    choice = int(main_logits[0].argmax())
    return [draft, int(main_logits[1].argmax())] if choice == draft else [choice, draft]


@pytest.mark.parametrize(
    "wrong, words",
    [
        (forgets_the_bonus, "also earns the token after it"),
        (verifies_with_row_1, "compared the draft with row 1"),
        (keeps_both_rows, "only row 0's argmax is kept"),
        (lambda logits, draft: torch.tensor(1.5), "list of token ids"),
    ],
)
def test_typical_mistakes_are_named(wrong, words):
    with pytest.raises(ExerciseError, match=words) as err:
        check_greedy_verify(wrong, seed=3)
    assert err.value.hint and err.value.seed == 3
