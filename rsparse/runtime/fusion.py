"""Fused calls of several R-Sparse layers for the decode engine, for either weight width: the
layers that share an input (q/k/v, gate/up) in ONE kernel call, gate/up with SiLU * up in its
epilogue, and o_proj / down_proj with the residual add and the next RMSNorm in its epilogue.

The caller checks that each layer would run the kernel on x (RSparseLinear.runs_kernel) and that
all have the same weight width (`weight_bits`: RSparseLinear 16, Int4RSparseLinear 4).
"""

from __future__ import annotations

import torch

from rsparse.runtime import int4_ops, ops


def _lists(layers) -> list[list]:
    return [list(a) for a in zip(*[layer.kernel_args() for layer in layers])]


def fused_projections(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """The outputs of layers that share the input x, from one fused kernel call."""
    if layers[0].weight_bits == 4:
        return int4_ops.int4_decode_linear_multi(x, *_lists(layers))
    return ops.decode_linear_multi(x, *_lists(layers))


def gated_projections(x: torch.Tensor, gate, up) -> torch.Tensor:
    """silu(gate(x)) * up(x) from one fused kernel call (the caller checks the activation is SiLU)."""
    if gate.weight_bits == 4:
        return int4_ops.int4_decode_linear_silu_mul(x, *_lists([gate, up]))
    return ops.decode_linear_silu_mul(x, *_lists([gate, up]))


def projection_add_rmsnorm(x: torch.Tensor, layer, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + layer(x), norm(that)) from one kernel call, norm a Llama-style RMSNorm module."""
    eps = float(norm.variance_epsilon)
    if layer.weight_bits == 4:
        return int4_ops.int4_decode_linear_add_rmsnorm(x, *layer.kernel_args(), residual, norm.weight, eps)
    return ops.decode_linear_add_rmsnorm(x, *layer.kernel_args(), residual, norm.weight, eps)
