"""The 4-bit decode kernels and the dense 4-bit product as `torch.library` ops, registered the
way rsparse/runtime/ops.py registers the 16-bit ones: opaque to the compiler (a fake
implementation gives the output's shape and dtype), so `torch.compile(fullgraph=True)` traces
through them, and on a device where Triton cannot run they compute the torch reference.

    torch.ops.rsparse.int4_decode_linear(x, qweight, scales_zeros, threshold, score_scale,
                                         lr_down, lr_up, bias, packed)
    torch.ops.rsparse.int4_decode_linear_multi(x, qweights, scales_zeros, thresholds,
                                               score_scales, lr_downs, lr_ups, biases, packeds)
    torch.ops.rsparse.int4_decode_linear_silu_mul(x, <the lists of int4_decode_linear_multi>)
    torch.ops.rsparse.int4_decode_linear_add_rmsnorm(x, <int4_decode_linear's arguments>, residual,
                                                     norm_weight, eps)
    torch.ops.rsparse.int4_linear(x, qweight, scales_zeros, packed, bias)

(qweight, scales_zeros): rsparse.core.int4.Int4Weight; packed: its tinygemm packing
(rsparse.runtime.kernels.int4_dense.tinygemm_pack) or None. The decode ops are
rsparse.runtime.kernels.triton_int4's functions (at most 8 rows; batches the per-shape table sends
to the dense path use `packed` there); int4_linear is the dense product for any number of rows
(prefill).
"""

from __future__ import annotations

from typing import Optional

import torch

from rsparse.runtime.kernels.int4_dense import int4_linear as _int4_linear
from rsparse.runtime.kernels import Epilogue, apply_epilogue_torch
from rsparse.runtime.kernels.triton_int4 import (int4_decode_linear as _decode_linear,
                                                 int4_decode_linear_add_rmsnorm as _decode_linear_add_rmsnorm,
                                                 int4_decode_linear_multi as _decode_linear_multi,
                                                 int4_decode_linear_silu_mul as _decode_linear_silu_mul,
                                                 int4_decode_linear_multi_reference,
                                                 int4_decode_linear_reference)
from rsparse.runtime.ops import kernel_runs_on


@torch.library.custom_op("rsparse::int4_decode_linear", mutates_args=())
def int4_decode_linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor,
                       threshold: torch.Tensor, score_scale: Optional[torch.Tensor],
                       lr_down: Optional[torch.Tensor], lr_up: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor],
                       packed: Optional[torch.Tensor]) -> torch.Tensor:
    """y = m(x) W^T + (x - m(x)) (A B)^T + bias for a 4-bit W, x (..., in)."""
    if kernel_runs_on(x.device):
        return _decode_linear(x, qweight, scales_zeros, threshold, score_scale, lr_down, lr_up,
                              bias, packed)
    return int4_decode_linear_reference(x, qweight, scales_zeros, threshold, score_scale, lr_down,
                                        lr_up, bias)


@int4_decode_linear.register_fake
def _int4_decode_linear_fake(x, qweight, scales_zeros, threshold, score_scale, lr_down, lr_up,
                             bias, packed):
    torch._check(x.shape[-1] == qweight.shape[0],
                 lambda: f"x has {x.shape[-1]} features, qweight expects {qweight.shape[0]}")
    return x.new_empty(*x.shape[:-1], scales_zeros.shape[1])


@torch.library.custom_op("rsparse::int4_decode_linear_multi", mutates_args=())
def int4_decode_linear_multi(x: torch.Tensor, qweights: list[torch.Tensor],
                             scales_zeros: list[torch.Tensor], thresholds: list[torch.Tensor],
                             score_scales: list[Optional[torch.Tensor]],
                             lr_downs: list[Optional[torch.Tensor]],
                             lr_ups: list[Optional[torch.Tensor]],
                             biases: list[Optional[torch.Tensor]],
                             packeds: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """int4_decode_linear for each part of 1-3 layers sharing x (q/k/v, gate/up), one set of
    launches."""
    parts = list(zip(qweights, scales_zeros, thresholds, score_scales, lr_downs, lr_ups, biases,
                     packeds))
    if kernel_runs_on(x.device):
        return list(_decode_linear_multi(x, parts))
    return list(int4_decode_linear_multi_reference(x, parts))


@int4_decode_linear_multi.register_fake
def _int4_decode_linear_multi_fake(x, qweights, scales_zeros, thresholds, score_scales, lr_downs,
                                   lr_ups, biases, packeds):
    torch._check(1 <= len(qweights) <= 3, lambda: f"1-3 parts, got {len(qweights)}")
    return [x.new_empty(*x.shape[:-1], sz.shape[1]) for sz in scales_zeros]


@torch.library.custom_op("rsparse::int4_decode_linear_silu_mul", mutates_args=())
def int4_decode_linear_silu_mul(x: torch.Tensor, qweights: list[torch.Tensor],
                                scales_zeros: list[torch.Tensor], thresholds: list[torch.Tensor],
                                score_scales: list[Optional[torch.Tensor]],
                                lr_downs: list[Optional[torch.Tensor]],
                                lr_ups: list[Optional[torch.Tensor]],
                                biases: list[Optional[torch.Tensor]],
                                packeds: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """silu(gate(x)) * up(x) for the 4-bit parts (gate, up), the product in the epilogue."""
    gate, up = zip(qweights, scales_zeros, thresholds, score_scales, lr_downs, lr_ups, biases, packeds)
    if kernel_runs_on(x.device):
        return _decode_linear_silu_mul(x, gate, up)
    (h,) = apply_epilogue_torch(Epilogue("silu_mul"), int4_decode_linear_multi_reference(x, [gate, up]))
    return h


@int4_decode_linear_silu_mul.register_fake
def _int4_decode_linear_silu_mul_fake(x, qweights, scales_zeros, thresholds, score_scales, lr_downs,
                                      lr_ups, biases, packeds):
    return x.new_empty(*x.shape[:-1], scales_zeros[0].shape[1])


@torch.library.custom_op("rsparse::int4_decode_linear_add_rmsnorm", mutates_args=())
def int4_decode_linear_add_rmsnorm(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor,
                                   threshold: torch.Tensor, score_scale: Optional[torch.Tensor],
                                   lr_down: Optional[torch.Tensor], lr_up: Optional[torch.Tensor],
                                   bias: Optional[torch.Tensor], packed: Optional[torch.Tensor],
                                   residual: torch.Tensor, norm_weight: torch.Tensor,
                                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, xn): h = residual + int4_decode_linear(x, ...), xn = norm_weight * rmsnorm(h)."""
    part = (qweight, scales_zeros, threshold, score_scale, lr_down, lr_up, bias, packed)
    if kernel_runs_on(x.device):
        return _decode_linear_add_rmsnorm(x, part, residual, norm_weight, eps)
    epi = Epilogue("add_rmsnorm", residual, norm_weight, eps)
    return apply_epilogue_torch(epi, [int4_decode_linear_reference(x, *part[:7])])


@int4_decode_linear_add_rmsnorm.register_fake
def _int4_decode_linear_add_rmsnorm_fake(x, qweight, scales_zeros, threshold, score_scale, lr_down,
                                         lr_up, bias, packed, residual, norm_weight, eps):
    torch._check(residual.shape[-1] == scales_zeros.shape[1],
                 lambda: "residual and the layer's output differ in width")
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


@torch.library.custom_op("rsparse::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor,
                packed: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Dense x W^T (+ bias) for a 4-bit W: tinygemm where packed is given, else dequantized."""
    return _int4_linear(x, qweight, scales_zeros, packed, bias)


@int4_linear.register_fake
def _int4_linear_fake(x, qweight, scales_zeros, packed, bias):
    return x.new_empty(*x.shape[:-1], scales_zeros.shape[1])
