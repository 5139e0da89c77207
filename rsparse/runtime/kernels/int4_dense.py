"""Dense 4-bit products (prefill, and the batches where the sparse kernel does not pay) through a
maintained library: torch's tinygemm op.

    packed = tinygemm_pack(p)                      # once per layer and device
    y = int4_linear(x, p.qweight, p.scales_zeros, packed, bias)

On CUDA, `aten._weight_int4pack_mm` (tinygemm: bf16 activations, (groups, out, 2) bf16 scales and
zeros, W = (q - 8) * scale + zero: the same convention and the same scales_zeros tensor as the
sparse format of rsparse/core/int4.py, so only the codes are repacked, into tinygemm's tiled
layout by `aten._convert_weight_to_int4pack`). fp16 activations go through it cast to bf16 (a
relative error of 2^-9 on x, far below the 4-bit weights'); fp32 activations, and every call
without a packing, dequantize and multiply (exact). On the CPU, `aten._weight_int4pack_mm_for_cpu`
where torch has it (same convention; its packing comes from `_convert_weight_to_int4pack_for_cpu`).

Why torch's op: it ships with torch (nothing to carry to the GPU machine), is what gpt-fast's
INT4 path uses, takes the sparse format's scales unchanged, and measured at least as fast as
gemlite at batch 1 in bf16: 14.8 us at 11008x4096 on the H200 (docs/int4-kernel.md) against
gemlite's 16.5 us in fp16 (an earlier lease, reference-facts.md section 6). In fp16 the two casts
cost it 6-7 us at the MLP shapes (21.3 us at 11008x4096). On the CPU the op serves bf16 calls of
up to CPU_OP_ROWS rows (decode steps), where it is fast.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rsparse.core.int4 import Int4Weight, dequantize, unpack_nibbles


# torch's CPU int4 op is fast for a few bf16 rows (decode: 0.04 ms against 2.3 ms to dequantize a
# 1536x576 layer) and slow for many rows or fp32 (1024 fp32 rows: 780 ms against 13 ms): past
# that, dequantize and multiply
CPU_OP_ROWS = 64


def _inner_k_tiles(K: int) -> int:
    """tinygemm's K tiling: K must be a multiple of 16 * innerKTiles (2, 4 or 8; larger is the
    faster layout)."""
    for t in (8, 4, 2):
        if K % (16 * t) == 0:
            return t
    raise ValueError(f"in_features {K} is not a multiple of 32 (tinygemm)")


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def tinygemm_pack(p: Int4Weight) -> Optional[torch.Tensor]:
    """p's codes in tinygemm's layout for p's device, or None where torch has no int4 op there
    (then int4_linear dequantizes)."""
    K = p.in_features
    codes = unpack_nibbles(p.qweight).t().contiguous()  # (out, in) uint8 codes 0..15
    if p.device.type == "cuda" and _has_op("_weight_int4pack_mm"):
        # tinygemm's input: (out, in / 2) uint8, input channel 2k in the HIGH nibble
        pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(K))
    if p.device.type == "cpu" and _has_op("_weight_int4pack_mm_for_cpu"):
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32),
                                                                  _inner_k_tiles(K))
    return None


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor,
                packed: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T (+ bias) for the 4-bit W of (qweight, scales_zeros), any number of rows, in x's
    dtype. packed: tinygemm_pack's tensor for x's device (None: dequantize and multiply)."""
    K = x.shape[-1]
    N = scales_zeros.shape[1]
    G = K // scales_zeros.shape[0]
    x2 = x.reshape(-1, K)
    if packed is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed, G,
                                               scales_zeros).to(x.dtype)
    elif packed is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x2.shape[0] <= CPU_OP_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, G,
                                                       scales_zeros.to(x.dtype))
    else:
        w = dequantize(Int4Weight(qweight, scales_zeros), x.dtype)
        y = F.linear(x2, w)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], N)
