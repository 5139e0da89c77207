"""GPU decode kernels for R-Sparse (Triton; optional dependency)."""

from .triton_rsparse import (
    MAX_BATCH_ROWS,
    rsparse_decode_linear,
    rsparse_decode_linear_reference,
    triton_available,
)

__all__ = [
    "MAX_BATCH_ROWS",
    "rsparse_decode_linear",
    "rsparse_decode_linear_reference",
    "triton_available",
]
