"""Triton, or a stand-in that says why there is none.

Triton publishes wheels for Linux only. On macOS and Windows the kernel files must still import:
each holds the plain-torch reference of its kernel beside the Triton program, and the references
are what the package runs there. So the kernel files take ``triton`` and ``tl`` from here. Where
Triton is installed they are the real modules; where it is not, the stand-ins let every
``@triton.jit`` and ``triton.autotune`` decoration, ``triton.Config`` and ``triton.cdiv`` at
import time succeed, and launching a kernel raises :class:`TritonUnavailable` with the reason.

``AVAILABLE`` says which case this is; ``INTERPRETED`` is True when ``TRITON_INTERPRET=1`` was
set before the first import (``@triton.jit`` then builds interpreter functions that run on CPU
tensors through numpy, slowly but with the GPU's numerics).
"""

from __future__ import annotations

import functools
import platform
from typing import Any

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    MISSING_REASON = ""
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except ImportError as error:
    AVAILABLE = False
    INTERPRETED = False
    MISSING_REASON = (
        f"Triton is not installed ({error}; this is {platform.system() or 'an unknown system'}). Triton has "
        "wheels for Linux only; elsewhere dsv3lite runs the plain-torch reference of each kernel "
        "instead: the same numbers, but no Triton program to step through"
    )


class TritonUnavailable(RuntimeError):
    """A Triton kernel was launched where Triton is not installed."""


if not AVAILABLE:

    class _Kernel:
        """What ``@triton.jit`` gives without Triton: the function, not launchable."""

        def __init__(self, fn: Any) -> None:
            functools.update_wrapper(self, fn)
            self.fn = fn  # as on Triton's JITFunction: the Python function, for its source

        def __getitem__(self, grid: Any) -> Any:
            raise TritonUnavailable(MISSING_REASON)

    class _Config:
        def __init__(self, kwargs: dict, num_warps: int = 4, num_stages: int = 2, **_: Any):
            self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages

    class _Triton:
        """The few names of ``triton`` the kernel files use at import time."""

        Config = _Config

        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            return _Kernel(fn) if fn is not None else _Kernel

        @staticmethod
        def autotune(*_: Any, **__: Any) -> Any:
            return lambda kernel: kernel

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(n - 1, 0).bit_length()

    class _Language:
        """``tl``: read inside kernel bodies, which never run without Triton, and in their
        signatures, where ``tl.constexpr`` marks compile-time arguments."""

        class constexpr:  # noqa: N801 - Triton's name
            pass

        def __getattr__(self, name: str) -> Any:
            raise TritonUnavailable(MISSING_REASON)

    triton = _Triton()  # type: ignore[assignment]
    tl = _Language()  # type: ignore[assignment]


def require() -> None:
    """Raise :class:`TritonUnavailable` (with the reason) when Triton is not installed."""
    if not AVAILABLE:
        raise TritonUnavailable(MISSING_REASON)


__all__ = [
    "AVAILABLE",
    "INTERPRETED",
    "MISSING_REASON",
    "TritonUnavailable",
    "require",
    "tl",
    "triton",
]
