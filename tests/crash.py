"""A kill -9 at a chosen file operation, without timing: for the crash-safety tests.

``Kill(at, after)`` patches every call that changes files (renames, deletes, mkdir, fsync,
opening for writing, safetensors' and torch's savers); the ``at``-th call kills the "process",
before it takes effect or right after. A kill runs no cleanup, so from then on every such call
raises ``Killed`` too (a BaseException, which ``except Exception`` handlers do not take), and the
disk is left as a real kill would leave it.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
from collections.abc import Callable

import pytest
import safetensors.torch
import torch

_OPS = [
    (os, "replace"),
    (os, "rename"),
    (os, "unlink"),
    (os, "rmdir"),
    (os, "mkdir"),
    (os, "fsync"),
    (shutil, "rmtree"),
    (safetensors.torch, "save_file"),
    (torch, "save"),
]


class Killed(BaseException):
    """The process died here."""


class Kill:
    """Die at the ``at``-th file operation (1-based), before it or just after it."""

    def __init__(self, at: int, after: bool) -> None:
        self.at, self.after, self.count = at, after, 0

    @property
    def fired(self) -> bool:
        return self.count >= self.at

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for module, name in _OPS:
            mp.setattr(module, name, self._op(getattr(module, name)))
        real_open = builtins.open
        counted_open = self._op(real_open)

        def open_(file, mode="r", *args, **kwargs):
            writes = any(c in mode for c in "wax+")
            return (counted_open if writes else real_open)(file, mode, *args, **kwargs)

        mp.setattr(builtins, "open", open_)
        mp.setattr(io, "open", open_)  # pathlib's write_text goes through io.open

    def _op(self, real: Callable) -> Callable:
        def op(*args, **kwargs):
            if self.fired:
                raise Killed  # dead already: nothing more happens
            self.count += 1
            if self.fired and not self.after:
                raise Killed
            result = real(*args, **kwargs)  # an operation inside it that counts dies there
            if self.fired:
                if hasattr(result, "close"):
                    result.close()  # a file opened for writing stays, empty
                raise Killed
            return result

        return op
