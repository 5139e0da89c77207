"""The R-Sparse decode kernels as `torch.library` ops, so `torch.compile(fullgraph=True)` traces
through `RSparseLinear` without a graph break and Inductor fuses the elementwise glue around it.

    torch.ops.rsparse.decode_linear(x, w_t, threshold, score_scale, lr_down, lr_up, bias)
    torch.ops.rsparse.decode_linear_multi(x, w_ts, thresholds, score_scales, lr_downs, lr_ups, biases)

are `rsparse.runtime.kernels.rsparse_decode_linear` (one R-Sparse or sparse-only layer, up to
MAX_BATCH_ROWS rows) and `rsparse_decode_linear_multi` (2-3 layers that share their input, such
as q/k/v or gate/up, in one set of launches; one output per layer). Each op is opaque to the compiler (`custom_op` with a fake implementation
that gives the output's shape and dtype); on a device where Triton cannot run (a CPU without
TRITON_INTERPRET) it computes the torch reference, so the same traced graph runs everywhere.
Dense layers need no op: they stay `F.linear`, which Inductor already understands.

    torch.ops.rsparse.decode_linear_silu_mul(x, w_ts, thresholds, score_scales, lr_downs, lr_ups, biases)
    torch.ops.rsparse.decode_linear_add_rmsnorm(x, w_t, threshold, score_scale, lr_down, lr_up, bias,
                                                residual, norm_weight, eps)

are the same call with the block's next step fused into its epilogue: silu(gate) * up for the
gate/up pair, and the residual add plus the next RMSNorm after o_proj / down_proj
(rsparse.runtime.kernels.fused_epilogues), so the decode step runs no kernel of its own for them.

    torch.ops.rsparse.decode_attention(q, k_cache, v_cache, lo, hi, scale)

is the split-KV decode attention over a static cache (`rsparse.runtime.kernels.decode_attention`),
which the decode engine uses on CUDA instead of SDPA with a mask.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Optional

import torch

from rsparse.runtime.kernels import (
    MAX_BATCH_ROWS,  # noqa: F401 (RSparseLinear reads the row limit from here)
    decode_attention as _decode_attention_kernel,
    decode_attention_reference,
    MAX_PARTS,
    rsparse_decode_linear,
    rsparse_decode_linear_add_rmsnorm,
    rsparse_decode_linear_multi,
    rsparse_decode_linear_multi_reference,
    rsparse_decode_linear_reference,
    rsparse_decode_linear_silu_mul,
    triton_available,
    Epilogue,
    apply_epilogue_torch,
)


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernel (not the torch reference) computes the ops on this device: on
    CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return triton_available() and (device.type == "cuda" or interpreted)


# Eager callers of RSparseLinear ("auto") get the torch reference: an eager loop is bound by host
# time, and the kernel's Python launch path costs more of it than the reference's few small
# launches (0.2-0.4 ms more per call in transformers' loop at 7-8B shapes, docs/decode-engine.md).
# Inside this context they get the kernel too (the engine's warm-up before it captures a CUDA
# graph without torch.compile).
_EAGER_KERNELS = contextvars.ContextVar("rsparse_eager_kernels", default=False)


@contextlib.contextmanager
def eager_kernels(enabled: bool = True):
    """Within: eager sparse calls of RSparseLinear ("auto") run the kernel, as compiled or
    captured ones do."""
    token = _EAGER_KERNELS.set(enabled)
    try:
        yield
    finally:
        _EAGER_KERNELS.reset(token)


def kernel_pays(x: torch.Tensor) -> bool:
    """Whether a sparse call on x with kernel="auto" should run the kernel: its launches are free
    of host cost only when traced by torch.compile or captured in a CUDA graph (or asked for)."""
    return (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
            or _EAGER_KERNELS.get())


@torch.library.custom_op("rsparse::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor,
                  score_scale: Optional[torch.Tensor], lr_down: Optional[torch.Tensor],
                  lr_up: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = m(x) W^T + (x - m(x)) (A B)^T + bias for x (..., in), w_t = W^T (in, out) row-contiguous,
    m(x) = |x| * score_scale > threshold; lr_down = B^T (in, r), lr_up = A^T (r, out) or None."""
    if kernel_runs_on(x.device):
        return rsparse_decode_linear(x, w_t, threshold, score_scale, lr_down, lr_up, bias)
    return rsparse_decode_linear_reference(x, w_t, threshold, score_scale, lr_down, lr_up, bias)


@decode_linear.register_fake
def _decode_linear_fake(x, w_t, threshold, score_scale, lr_down, lr_up, bias):
    torch._check(x.shape[-1] == w_t.shape[0], lambda: f"x has {x.shape[-1]} features, w_t expects {w_t.shape[0]}")
    return x.new_empty(*x.shape[:-1], w_t.shape[1])


@torch.library.custom_op("rsparse::decode_linear_multi", mutates_args=())
def decode_linear_multi(x: torch.Tensor, w_ts: list[torch.Tensor], thresholds: list[torch.Tensor],
                        score_scales: list[Optional[torch.Tensor]], lr_downs: list[Optional[torch.Tensor]],
                        lr_ups: list[Optional[torch.Tensor]], biases: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """decode_linear for each part i (w_ts[i], thresholds[i], ...) of layers sharing x."""
    parts = list(zip(w_ts, thresholds, score_scales, lr_downs, lr_ups, biases))
    if kernel_runs_on(x.device):
        return list(rsparse_decode_linear_multi(x, parts))
    return list(rsparse_decode_linear_multi_reference(x, parts))


@decode_linear_multi.register_fake
def _decode_linear_multi_fake(x, w_ts, thresholds, score_scales, lr_downs, lr_ups, biases):
    torch._check(1 <= len(w_ts) <= MAX_PARTS, lambda: f"1-{MAX_PARTS} parts, got {len(w_ts)}")
    return [x.new_empty(*x.shape[:-1], w_t.shape[1]) for w_t in w_ts]


@torch.library.custom_op("rsparse::decode_linear_silu_mul", mutates_args=())
def decode_linear_silu_mul(x: torch.Tensor, w_ts: list[torch.Tensor], thresholds: list[torch.Tensor],
                           score_scales: list[Optional[torch.Tensor]], lr_downs: list[Optional[torch.Tensor]],
                           lr_ups: list[Optional[torch.Tensor]], biases: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """silu(gate(x)) * up(x) for the two parts (gate, up) given as decode_linear_multi's lists."""
    gate, up = zip(w_ts, thresholds, score_scales, lr_downs, lr_ups, biases)
    if kernel_runs_on(x.device):
        return rsparse_decode_linear_silu_mul(x, gate, up)
    (h,) = apply_epilogue_torch(Epilogue("silu_mul"), rsparse_decode_linear_multi_reference(x, [gate, up]))
    return h


@decode_linear_silu_mul.register_fake
def _decode_linear_silu_mul_fake(x, w_ts, thresholds, score_scales, lr_downs, lr_ups, biases):
    torch._check(len(w_ts) == 2, lambda: f"gate and up: 2 parts, got {len(w_ts)}")
    return x.new_empty(*x.shape[:-1], w_ts[0].shape[1])


@torch.library.custom_op("rsparse::decode_linear_add_rmsnorm", mutates_args=())
def decode_linear_add_rmsnorm(x: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor,
                              score_scale: Optional[torch.Tensor], lr_down: Optional[torch.Tensor],
                              lr_up: Optional[torch.Tensor], bias: Optional[torch.Tensor], residual: torch.Tensor,
                              norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, xn): h = residual + decode_linear(x, ...), xn = norm_weight * rmsnorm(h) (Llama's RMSNorm)."""
    part = (w_t, threshold, score_scale, lr_down, lr_up, bias)
    if kernel_runs_on(x.device):
        return rsparse_decode_linear_add_rmsnorm(x, part, residual, norm_weight, eps)
    epi = Epilogue("add_rmsnorm", residual, norm_weight, eps)
    return apply_epilogue_torch(epi, [rsparse_decode_linear_reference(x, *part)])


@decode_linear_add_rmsnorm.register_fake
def _decode_linear_add_rmsnorm_fake(x, w_t, threshold, score_scale, lr_down, lr_up, bias, residual, norm_weight,
                                    eps):
    torch._check(residual.shape[-1] == w_t.shape[1], lambda: "residual and the layer's output differ in width")
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)


@torch.library.custom_op("rsparse::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row (q: B, H, 1, D) over the cache slots lo[b] <= slot <= hi of
    k_cache / v_cache (B, H_kv, S, D): split-KV Triton kernel, or SDPA with a mask where the
    kernel does not run."""
    if kernel_runs_on(q.device):
        return _decode_attention_kernel(q, k_cache, v_cache, lo, hi, scale)
    return decode_attention_reference(q, k_cache, v_cache, lo, hi, scale).contiguous()


@decode_attention.register_fake
def _decode_attention_fake(q, k_cache, v_cache, lo, hi, scale):
    return q.new_empty(q.shape)
