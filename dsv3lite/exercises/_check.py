"""What every check shares: the error a wrong answer raises, fresh inputs, and comparisons.

A check draws fresh random inputs (``seed=None``) or repeatable ones (``seed=1234``), calls the
learner's function on copies of them, and compares the answer with the package's. When they
differ it tries the usual wrong answers one by one: the first that matches names the mistake.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..testing import rel_err


class ExerciseError(AssertionError):
    """A wrong answer. ``str(err)`` says what is wrong, ``err.hint`` how to put it right, and
    ``err.seed`` which inputs showed it (pass it back as ``seed=`` to see them again)."""

    def __init__(self, message: str, hint: str | None = None, seed: int | None = None) -> None:
        self.message, self.hint, self.seed = message, hint, seed
        text = message
        if hint:
            text += f"\nHint: {hint}"
        if seed is not None:
            text += (
                f"\n(inputs drawn with seed={seed}; pass seed={seed} to the check to repeat them)"
            )
        super().__init__(text)


class NotAttempted(Exception):
    """The learner's function is still the stub: it returned None or raised
    NotImplementedError. Not a wrong answer: ``exercise`` turns it into one line."""


def exercise(check: Callable) -> Callable:
    """Decorates every public check. A stub not yet written (``NotAttempted``) gets one line
    that says what to do, instead of an error, so that Run All runs a notebook to its end and
    its saved output shows the exercise still open; any other wrong answer raises
    ExerciseError."""

    @functools.wraps(check)
    def run(fn: Callable, *args: Any, **kwargs: Any) -> None:
        try:
            check(fn, *args, **kwargs)
        except NotAttempted:
            name = getattr(fn, "__name__", "your function")
            print(
                f"… not done yet — {name} is still the stub: write its body in the cell above, "
                "then run this cell again"
            )

    return run


def fresh_seed(seed: int | None) -> int:
    """``seed`` itself, or a new one: every run of a check sees new inputs unless asked not to."""
    return random.SystemRandom().randrange(2**31) if seed is None else int(seed)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block, and give the caller's state back after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def passed(what: str) -> None:
    """The one line a correct answer prints."""
    print(f"✓ correct — {what}")


def call(fn: Callable, args: tuple, seed: int, hint: str, returns_none: bool = False) -> Any:
    """The learner's ``fn(*args)``; an exception it raises becomes an ExerciseError that shows
    it (the original stays attached as the cause, so its traceback is still there). None
    (unless ``returns_none``: a kernel launch) or NotImplementedError: ``NotAttempted``."""
    try:
        result = fn(*args)
    except ExerciseError:
        raise
    except NotImplementedError as err:
        raise NotAttempted from err
    except Exception as err:  # noqa: BLE001 - any error of the learner's code is reported
        name = getattr(fn, "__name__", "your function")
        raise ExerciseError(
            f"{name} raised {type(err).__name__}: {err}", hint=hint, seed=seed
        ) from err
    if result is None and not returns_none:
        raise NotAttempted
    return result


def as_tensor(got: Any, what: str, seed: int) -> torch.Tensor:
    """A torch tensor from the learner's answer (numpy arrays and lists are accepted)."""
    if isinstance(got, torch.Tensor):
        return got.detach()
    if got is None:
        raise ExerciseError(
            f"your function returned None where {what} was expected",
            hint="write the exercise's body and end it with `return ...`",
            seed=seed,
        )
    if isinstance(got, np.ndarray | list | tuple | int | float):
        return torch.as_tensor(np.asarray(got))
    raise ExerciseError(
        f"{what} should be a tensor, got {type(got).__name__}",
        hint="return a torch.Tensor (or a numpy array)",
        seed=seed,
    )


def expect_shape(
    got: torch.Tensor,
    expected: tuple[int, ...],
    what: str,
    seed: int,
    hint: str,
    known: dict[tuple[int, ...], str] | None = None,
) -> None:
    """Raise unless ``got`` has shape ``expected``; ``known`` maps a typical wrong shape to what
    it usually means."""
    shape = tuple(got.shape)
    if shape == tuple(expected):
        return
    message = f"{what} has shape {list(shape)}, expected {list(expected)}"
    reason = (known or {}).get(shape)
    if reason:
        message += f": {reason}"
    raise ExerciseError(message, hint=hint, seed=seed)


def close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Same shape and ‖got − ref‖/‖ref‖ ≤ tol."""
    return tuple(got.shape) == tuple(ref.shape) and rel_err(got, ref) <= tol


def diagnose(
    got: torch.Tensor,
    mistakes: list[tuple[torch.Tensor, str, str]],
    tol: float,
    seed: int,
) -> None:
    """Raise the ExerciseError of the first (answer, message, hint) in ``mistakes`` that ``got``
    matches; return quietly when it matches none."""
    for answer, message, hint in mistakes:
        if close(got, answer, tol):
            raise ExerciseError(message, hint=hint, seed=seed)
