"""GPU decode kernels for R-Sparse (Triton; optional dependency)."""

from .triton_attention import decode_attention, decode_attention_reference
from .triton_rsparse import (
    MAX_BATCH_ROWS,
    MAX_PARTS,
    rsparse_decode_linear,
    rsparse_decode_linear_add_rmsnorm,
    rsparse_decode_linear_multi,
    rsparse_decode_linear_multi_reference,
    rsparse_decode_linear_reference,
    rsparse_decode_linear_silu_mul,
    triton_available,
)
from .fused_epilogues import Epilogue, apply_epilogue_torch

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "MAX_BATCH_ROWS",
    "MAX_PARTS",
    "rsparse_decode_linear",
    "rsparse_decode_linear_add_rmsnorm",
    "rsparse_decode_linear_multi",
    "rsparse_decode_linear_multi_reference",
    "rsparse_decode_linear_reference",
    "rsparse_decode_linear_silu_mul",
    "triton_available",
    "Epilogue",
    "apply_epilogue_torch",
]
