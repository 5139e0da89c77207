"""triton is optional: the guarded import and the interpreter switch, for every kernel module.

Without triton the kernel modules still import (``_HAS_TRITON`` False, no kernels defined) and
the torch references run. ``_interpret_mode()``: TRITON_INTERPRET=1, the kernels run on the CPU
in Triton's interpreter (the tests); it must be set before triton is imported.
"""

from __future__ import annotations

import os

try:  # triton is optional: the package must import without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
