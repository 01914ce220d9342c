"""Errors for bad input, and the checks that raise them.

A ``UserInputError`` says what a user got wrong: the field or flag, what is allowed, what was
given. ``python -m dsv3lite`` prints it as one line (``error: ...``, exit status 2) instead of a
traceback; any other exception is a bug and keeps its traceback. Both classes subclass the
built-in errors (ValueError, TypeError), so ``except ValueError`` still catches them.
"""

from __future__ import annotations

import math


class UserInputError(ValueError):
    """A value, file or flag the user handed us is unusable; the message names it."""


class UserTypeError(UserInputError, TypeError):
    """A value of the wrong type: None, a string or a bool where a number belongs."""


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """``value`` must be an int (a bool is not one here) in [low, high]."""
    allowed = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserTypeError(f"{name} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise UserInputError(f"{name} must be {allowed}, got {value!r}")


def check_number(name: str, value: object, low: float = 0.0, strict: bool = True) -> None:
    """``value`` must be a finite int or float above ``low`` (``strict``) or at least ``low``:
    NaN or infinity in a weight or a rate trains NaN without any other error."""
    allowed = f"a finite number {'>' if strict else '>='} {low:g}"
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UserTypeError(f"{name} must be {allowed}, got {value!r}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise UserInputError(f"{name} must be {allowed}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """``value`` must be True or False: 0, 1 and "false" are not (``bool("false")`` is True)."""
    if not isinstance(value, bool):
        raise UserTypeError(f"{name} must be true or false, got {value!r}")
