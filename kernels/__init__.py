"""Triton kernels, one file per kernel family, each beside its plain-torch reference.

Installed as ``dsv3lite.kernels``. ``TRITON_AVAILABLE`` says whether Triton is installed (it has
Linux wheels only); where it is not, ``TRITON_MISSING_REASON`` says so in a sentence, the
package runs the references, and ``triton``/``tl`` here are stand-ins that let kernel code be
defined (see ``_triton.py``). Where it is, ``triton`` and ``tl`` are Triton's own modules.
"""

from ._triton import AVAILABLE as TRITON_AVAILABLE
from ._triton import MISSING_REASON as TRITON_MISSING_REASON
from ._triton import TritonUnavailable, tl, triton

__all__ = ["TRITON_AVAILABLE", "TRITON_MISSING_REASON", "TritonUnavailable", "tl", "triton"]
