"""Triton decode kernels for R-Sparse linear layers (kernel v7): host side and public API.

This module validates a call, picks its path and config, and holds the public functions. The
rest, in this folder: rsparse_launch.py (scratch buffers, kernel launches), the ``@triton.jit``
device code in rsparse_device_kernels.py (the launched kernels), rsparse_device_sparse.py and
rsparse_device_lowrank.py (one part's sparse and low-rank terms) and rsparse_device_common.py
(shared helpers); rsparse_configs.py (tile configs, the per-shape ``_CONFIG_TABLE``),
rsparse_reference.py (the torch references), fused_epilogues.py.

Math (per input row ``b``; ``W ~= A B``, ``w_t = W^T`` (in, out), ``lr_down = B^T`` (in, r),
``lr_up = A^T`` (r, out)):

    m[b, j] = |x[b, j]| * score_scale[j] > threshold          (strict; fp32 compare)
    z[b]    = sum_{j: not m[b, j]} x[b, j] * lr_down[j, :]     (fp32)
    y[b]    = sum_{j: m[b, j]} x[b, j] * w_t[j, :] + z[b] @ lr_up (+ bias)

Public functions: :func:`rsparse_decode_linear` (one layer) and
:func:`rsparse_decode_linear_multi` (2-3 layers that share the input x, e.g. q/k/v or gate/up,
each with its own threshold, score_scale, factors and bias: one set of launches for all of
them), plus their torch references; :func:`rsparse_decode_linear_silu_mul` and
:func:`rsparse_decode_linear_add_rmsnorm` are those calls with a decoder block's next step fused
into the epilogue.

Design (no host synchronisation, no memset, CUDA-graph safe; all scratch is zero again after
each call). Launches per call, chained with programmatic dependent launch (PDL) on the GPU so
each one is resident before its predecessor ends:

1. ``_z_kernel`` (only if some part has a low-rank term): split-k over ``lr_down`` rows; each
   program adds (fp32 atomics) the partial ``z`` of a chunk of input channels (the DROPPED
   ones; rows nobody drops are not fetched) into a zeroed ``z`` buffer.
2. ``_main_kernel``: program ids [low-rank tiles of every part][sparse tiles of every part].
   The low-rank tiles (lowest ids, so they are scheduled first) wait for ``z`` (``gdc_wait``)
   and add ``z @ lr_up[chunk, tile]``. Each sparse tile (column tile n, chunk kc of CH input
   channels) computes its chunk's keep mask itself, writes the compacted list of kept channels
   to its own scratch slot (cumsum + scatter), barriers, and walks only the kept rows of
   ``w_t``, G at a time with the next group's loads in flight (COMPACT), or loads whole row
   tiles predicated on the mask (plain, "TEAL-style").
   Partial sums go to an fp32 workspace with relaxed atomic adds. (LR_FUSED: low-rank tiles
   that need no z pass; measured slower, kept as an option.)
3. ``_epilogue_kernel``, after ``gdc_wait`` on the main grid: y = cast(ws + bias) in x's
   dtype, ws (and z) zeroed for the next call. (Writing y in the main kernel instead, by the
   last program to finish each column tile, was measured 1.1-1.6x slower per call and removed:
   docs/kernel-notes.md, v5.) :func:`rsparse_decode_linear_silu_mul` and
   :func:`rsparse_decode_linear_add_rmsnorm` replace it with a fused epilogue that also does the
   decoder block's next step (fused_epilogues.py).

PDL rules that make the chain safe whatever kernel precedes a call: every kernel that reads or
writes data another grid produced calls ``gdc_wait`` first (the main kernel's sparse tiles skip
it only when the z kernel precedes them in the same call: that kernel waited for everything
before it before it let the main kernel start), and ``gdc_launch_dependents`` only lets the
next grid be scheduled, never lets it read.

Batch (M > 1, at most 8 rows): every row has its own mask (exact per-row semantics); a row of
``w_t`` is read if ANY batch row keeps the channel (union) and rows that do not keep it add
exactly 0. Where the union makes the sparse kernel lose to cuBLAS (measured per shape and
batch class on the H200, see ``_CONFIG_TABLE``), the call runs the "cublas" path: one Triton
launch splits x into x*m and x*(1-m) per part, then cuBLAS products (same function; the sparse
and low-rank products are each rounded to x's dtype, instead of one fp32 accumulator).
Measurements, designs tried and their outcomes: docs/kernel-notes.md.

Constraints: ``w_t``, ``lr_down``, ``lr_up`` row-contiguous (``stride(-1) == 1``), same dtype as
``x`` (fp16, bf16 or fp32); ``score_scale`` fp32 (other dtypes are converted per call); the
threshold is compared in fp32. Scratch buffers are cached per device and shape and reused:
calls must be ordered on one stream (as in a decode loop or CUDA graph); do the first call for a
shape before graph capture so that the scratch is not allocated inside the capture.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

# Private names the tests and the benchmark use through this module are re-exported here (the
# config dicts and _SCRATCH are the same objects: mutating a config dict reaches _pick_config).
from .rsparse_configs import (  # noqa: F401
    _CONFIG_TABLE,
    _DEFAULT_CONFIGS,
    _LR_DEFAULTS,
    _MODE_DEFAULTS,
    _batch_class,
    _pick_config,
)
from .optional_triton import _HAS_TRITON, _interpret_mode
from .fused_epilogues import MAX_NORM_WIDTH, Epilogue, add_rmsnorm_epilogue, apply_epilogue_torch
from .rsparse_launch import MAX_PARTS, _SCRATCH, _Part, _run_cublas, _run_triton  # noqa: F401
from .rsparse_reference import (  # noqa: F401
    _part_tuple,
    rsparse_decode_linear_multi_reference,
    rsparse_decode_linear_reference,
)

__all__ = [
    "MAX_BATCH_ROWS",
    "MAX_PARTS",
    "rsparse_decode_linear",
    "rsparse_decode_linear_multi",
    "rsparse_decode_linear_multi_reference",
    "rsparse_decode_linear_reference",
    "triton_available",
]

MAX_BATCH_ROWS = 8
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True if triton is importable and can run here (a CUDA device, or TRITON_INTERPRET=1)."""
    if not _HAS_TRITON:
        return False
    return bool(torch.cuda.is_available() or _interpret_mode())


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _check_2d(name, t, shape, dtype):
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (same as x), got {t.dtype}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} must be row-contiguous (stride(1) == 1), got strides {t.stride()}")


def _validate_part(x, K, w_t, threshold, score_scale, lr_down, lr_up, bias) -> _Part:
    if w_t.dim() != 2:
        raise ValueError(f"w_t must be 2-D (in, out), got shape {tuple(w_t.shape)}")
    if w_t.shape[0] != K:
        raise ValueError(f"x last dim {K} does not match w_t in-dim {w_t.shape[0]}")
    N = w_t.shape[1]
    _check_2d("w_t", w_t, (K, N), x.dtype)
    dev = x.device
    if w_t.device != dev:
        raise ValueError("x and w_t must be on the same device")
    if (lr_down is None) != (lr_up is None):
        raise ValueError("give both lr_down and lr_up, or neither")
    has_lr = lr_down is not None and lr_down.numel() > 0 and lr_up.numel() > 0
    R = 0
    if has_lr:
        R = lr_down.shape[1] if lr_down.dim() == 2 else -1
        _check_2d("lr_down", lr_down, (K, R), x.dtype)
        _check_2d("lr_up", lr_up, (R, N), x.dtype)
        if lr_down.device != dev or lr_up.device != dev:
            raise ValueError("lr_down/lr_up must be on x's device")
    if score_scale is not None:
        if score_scale.numel() != K:
            raise ValueError(f"score_scale must have {K} elements, got {score_scale.numel()}")
        score_scale = score_scale.reshape(K)
        if (score_scale.dtype != torch.float32 or not score_scale.is_contiguous()
                or score_scale.device != dev):
            score_scale = score_scale.to(device=dev, dtype=torch.float32).contiguous()
    if bias is not None:
        if bias.numel() != N:
            raise ValueError(f"bias must have {N} elements, got {bias.numel()}")
        bias = bias.reshape(N)
        if not bias.is_contiguous():
            bias = bias.contiguous()
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError("threshold tensor must have one element")
        thr_t = threshold
        if thr_t.device != dev or thr_t.dtype != torch.float32:
            thr_t = thr_t.to(device=dev, dtype=torch.float32)
        thr_val = 0.0
    else:
        thr_t, thr_val = None, float(threshold)
    return _Part(w_t, N, thr_t, thr_val, score_scale, lr_down if has_lr else None,
                 lr_up if has_lr else None, R, bias)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------

def _decode(x: torch.Tensor, raw_parts: Sequence[tuple], outs: Sequence[Optional[torch.Tensor]],
            _config: Optional[dict], epi: Optional[Epilogue] = None) -> list:
    """Shared body of the public functions: validate, allocate, dispatch; returns (M, N_p) views.
    With a fused epilogue, its outputs instead (apply_epilogue_torch's), however they were
    computed."""
    if not _HAS_TRITON:
        raise RuntimeError("rsparse_decode_linear needs triton (pip install triton)")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be one of fp16/bf16/fp32, got {x.dtype}")
    K = x.shape[-1]
    lead = x.shape[:-1]
    M = math.prod(lead) if len(lead) else 1
    if M > MAX_BATCH_ROWS:
        raise ValueError(f"rsparse_decode_linear supports at most {MAX_BATCH_ROWS} rows "
                         f"(flattened leading dims), got {M}")
    parts = [_validate_part(x, K, *rp) for rp in raw_parts]
    dev = x.device
    ys = []
    for p, out in zip(parts, outs):
        if out is not None and (out.numel() != M * p.N or out.dtype != x.dtype
                                or out.device != dev or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of {M}x{p.N} elements "
                             f"on {dev}")
        ys.append(torch.empty(M, p.N, dtype=x.dtype, device=dev) if out is None
                  else out.view(M, p.N))
    done = lambda: list(apply_epilogue_torch(epi, ys)) if epi is not None else ys  # noqa: E731
    if M == 0:
        return done()
    if K == 0:
        for p, y in zip(parts, ys):
            y.zero_()
            if p.bias is not None:
                y += p.bias.to(x.dtype)
        return done()
    live = [i for i, p in enumerate(parts) if p.N > 0]
    if not live:
        return done()
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = _pick_config(M, K, sum(p.N for p in parts), x.element_size(), _config,
                       has_lr=any(p.R for p in parts))
    if torch.are_deterministic_algorithms_enabled():
        cfg["DET"] = True
    run_parts, run_ys = [parts[i] for i in live], [ys[i] for i in live]
    if cfg["PATH"] == "cublas":
        _run_cublas(x2, run_parts, run_ys)
    elif epi is not None and len(live) == len(parts) and (
            epi.kind != "add_rmsnorm" or parts[0].N <= MAX_NORM_WIDTH):
        _run_triton(x2, run_parts, run_ys, cfg, epi)
        return [ys[0], epi.xn] if epi.kind == "add_rmsnorm" else [ys[0]]
    else:
        _run_triton(x2, run_parts, run_ys, cfg)
    return done()


def rsparse_decode_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: Union[float, torch.Tensor],
                          score_scale: Optional[torch.Tensor] = None,
                          lr_down: Optional[torch.Tensor] = None,
                          lr_up: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None,
                          *, out: Optional[torch.Tensor] = None,
                          _config: Optional[dict] = None) -> torch.Tensor:
    """R-Sparse decode linear layer (Triton; no host sync, CUDA-graph safe).

    y[b] = sum_{j: m[b,j]} x[b,j] w_t[j,:] + (sum_{j: not m[b,j]} x[b,j] lr_down[j,:]) @ lr_up + bias
    with m[b,j] = |x[b,j]| * score_scale[j] > threshold (strict, compared in fp32).

    Args:
        x: (..., in) fp16/bf16/fp32; leading dims are flattened to M rows, M <= 8 (ValueError above).
        w_t: (in, out) transposed weight, same dtype as x, rows contiguous (stride(1) == 1).
        threshold: Python float (baked into a captured graph) or a 0-d/1-element tensor (read by
            the kernel at run time: no recompile, graph-safe; fp32 on x's device avoids a copy).
            +inf keeps nothing.
        score_scale: optional (in,) per-channel score multiplier (fp32 preferred); None means 1.
        lr_down: optional (in, r) = B^T, lr_up: optional (r, out) = A^T, same dtype as x; None or
            r == 0 gives the sparse-only GEMV.
        bias: optional (out,).
        out: optional preallocated output, contiguous, x's dtype, shape (..., out) or (M, out);
            every element is overwritten. Returned (reshaped to x's leading dims).

    Each row has its own mask (exact per-row semantics). Accumulation is in fp32 (the "cublas"
    batch path: fp32 inside each product, 16-bit between them); the output has x's dtype and
    shape (..., out).
    """
    lead = x.shape[:-1]
    (y,) = _decode(x, [(w_t, threshold, score_scale, lr_down, lr_up, bias)], [out], _config)
    return y.view(*lead, y.shape[-1])


def rsparse_decode_linear_multi(x: torch.Tensor, parts: Sequence[tuple], *,
                                outs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                                _config: Optional[dict] = None) -> tuple:
    """Several R-Sparse layers that share the input x (q/k/v, gate/up) in one set of launches.

    Args:
        x: as for :func:`rsparse_decode_linear` ((..., in), M <= 8 rows).
        parts: 1 to 3 tuples ``(w_t, threshold, score_scale, lr_down, lr_up, bias)`` (trailing
            entries may be left out: None). Each part has the constraints of the single call's
            arguments; the out-dims may differ (grouped-query k/v), the in-dim is x's.
        outs: optional sequence (one per part) of preallocated outputs or None.

    Returns a tuple with one fresh (or the given) tensor per part, each (..., out_p) in x's
    dtype, equal to ``rsparse_decode_linear(x, *part)``.
    """
    parts = [_part_tuple(p) for p in parts]
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"rsparse_decode_linear_multi takes 1 to {MAX_PARTS} parts, "
                         f"got {len(parts)}")
    if outs is None:
        outs = [None] * len(parts)
    if len(outs) != len(parts):
        raise ValueError("outs must have one entry per part")
    lead = x.shape[:-1]
    ys = _decode(x, parts, outs, _config)
    return tuple(y.view(*lead, y.shape[-1]) for y in ys)


def rsparse_decode_linear_silu_mul(x: torch.Tensor, gate: tuple, up: tuple, *,
                                   _config: Optional[dict] = None) -> torch.Tensor:
    """silu(gate(x)) * up(x) for two R-Sparse layers of equal width that share x (a gated MLP's
    gate_proj and up_proj), in one set of launches: the epilogue computes the product, so no
    kernel runs for it (rsparse.runtime.kernels.fused_epilogues). gate, up: parts as for
    :func:`rsparse_decode_linear_multi`. Returns (..., out) in x's dtype."""
    parts = [_part_tuple(gate), _part_tuple(up)]
    if parts[0][0].shape[-1] != parts[1][0].shape[-1]:
        raise ValueError(f"gate and up must have the same width, got {parts[0][0].shape[-1]} "
                         f"and {parts[1][0].shape[-1]}")
    (h,) = _decode(x, parts, [None, None], _config, Epilogue("silu_mul"))
    return h.view(*x.shape[:-1], h.shape[-1])


def rsparse_decode_linear_add_rmsnorm(x: torch.Tensor, part: tuple, residual: torch.Tensor,
                                      norm_weight: torch.Tensor, eps: float, *,
                                      _config: Optional[dict] = None) -> tuple:
    """(h, xn) with h = residual + layer(x) and xn = norm_weight * rmsnorm(h) (transformers'
    Llama RMSNorm, eps inside the square root), the layer being the R-Sparse part (as for
    :func:`rsparse_decode_linear_multi`): a block's o_proj or down_proj, its residual add and
    the next norm in one set of launches. residual: (..., out) in x's dtype; norm_weight: (out,)."""
    part = _part_tuple(part)
    N, lead = part[0].shape[-1], x.shape[:-1]
    epi = add_rmsnorm_epilogue(x, N, residual, norm_weight, eps)
    h, xn = _decode(x, [part], [None], _config, epi)
    return h.view(*lead, N), xn.view(*lead, N)
