"""Triton decode kernels for R-Sparse linear layers (kernel v5).

Math (per input row ``b``; ``W ~= A B``, ``w_t = W^T`` (in, out), ``lr_down = B^T`` (in, r),
``lr_up = A^T`` (r, out)):

    m[b, j] = |x[b, j]| * score_scale[j] > threshold          (strict; fp32 compare)
    z[b]    = sum_{j: not m[b, j]} x[b, j] * lr_down[j, :]     (fp32)
    y[b]    = sum_{j: m[b, j]} x[b, j] * w_t[j, :] + z[b] @ lr_up (+ bias)

Public functions: :func:`rsparse_decode_linear` (one layer) and
:func:`rsparse_decode_linear_multi` (2-3 layers that share the input x, e.g. q/k/v or gate/up,
each with its own threshold, score_scale, factors and bias: one set of launches for all of
them), plus their torch references.

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
   ``w_t``, G at a time (COMPACT; REGIDX selects each group's rows from registers instead of
   the slot), or loads whole row tiles predicated on the mask (plain, "TEAL-style").
   Partial sums go to an fp32 workspace with relaxed atomic adds. (LR_FUSED: low-rank tiles
   that need no z pass; measured slower, kept as an option.)
3. The epilogue, y = cast(ws + bias) in x's dtype, ws (and z) zeroed for the next call:
   EPI "launch" (default): a third launch, ``_epilogue_kernel``, after ``gdc_wait`` on the
   main grid. EPI "tile" (v5, an option: measured slower, see docs/kernel-notes.md): inside the
   main kernel, by the last program to finish each column tile. Every program of a tile counts
   itself in at the tile's int32 counter once its partial sums are in: each THREAD waits for
   the results of its atomics and executes
   ``fence.acq_rel.gpu``, a CTA reduction (barrier) follows, and only then does one thread add
   to the counter (acq_rel); the program that sees the count complete reads ws from L2 (.cg),
   writes y, zeroes ws and resets the counter. (Kernel v1 raced because one thread's fence
   after a barrier did not order the other warps' ``red.add``s.) The low-rank programs count
   themselves in at a second counter per part once they have read z; the last zeroes z.

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
import os
import threading
from typing import NamedTuple, Optional, Sequence, Union

import torch

try:  # triton is optional: the module must import without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False

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
MAX_PARTS = 3
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    """True if triton is importable and can run here (a CUDA device, or TRITON_INTERPRET=1)."""
    if not _HAS_TRITON:
        return False
    return bool(torch.cuda.is_available() or _interpret_mode())


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------

def _threshold_f32(threshold, device) -> torch.Tensor:
    return torch.as_tensor(threshold, dtype=torch.float32, device=device).reshape(())


def rsparse_decode_linear_reference(x, w_t, threshold, score_scale=None, lr_down=None, lr_up=None,
                                    bias=None) -> torch.Tensor:
    """Plain torch version of :func:`rsparse_decode_linear` (same semantics, fp32 accumulate).

    Works for any number of rows and on any device; output in ``x``'s dtype.
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    xf = x.reshape(-1, K).float()
    score = xf.abs()
    if score_scale is not None:
        score = score * score_scale.reshape(1, K).float()
    keep = score > _threshold_f32(threshold, x.device)
    y = (xf * keep) @ w_t.float()
    if lr_down is not None and lr_up is not None and lr_down.numel() > 0 and lr_up.numel() > 0:
        z = (xf * ~keep) @ lr_down.float()
        y = y + z @ lr_up.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, w_t.shape[1])


def _part_tuple(part) -> tuple:
    """(w_t, threshold, score_scale, lr_down, lr_up, bias) from a tuple of 2 to 6 entries."""
    part = tuple(part)
    if not 2 <= len(part) <= 6:
        raise ValueError("each part is (w_t, threshold[, score_scale[, lr_down[, lr_up[, bias]]]])")
    return part + (None,) * (6 - len(part))


def rsparse_decode_linear_multi_reference(x, parts) -> tuple:
    """Plain torch version of :func:`rsparse_decode_linear_multi`: one reference call per part."""
    return tuple(rsparse_decode_linear_reference(x, *_part_tuple(p)) for p in parts)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _pdl_wait(USE_PDL: tl.constexpr):
        """Wait until the preceding grid completed and its writes are visible (PDL)."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _pdl_release(USE_PDL: tl.constexpr):
        """Let the next grid be scheduled (it still waits with _pdl_wait before reading)."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _fenced(done, NT: tl.constexpr, FENCE: tl.constexpr):
        """An int32 zero that exists only once every thread of the program holds its `done`
        values (results of its workspace atomics, or loads) and has executed fence.acq_rel.gpu:
        added to a counter increment (done by one thread), it orders that increment after every
        thread's memory operations (the v1 race: one thread's fence does not order the other
        warps' atomics). NT: threads per program (one fence each). Without FENCE (the
        interpreter runs programs one after another), 0."""
        if FENCE:
            s = tl.sum(done.to(tl.int32, bitcast=True))  # every thread waits for its results
            f = tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, 0;", "=r,r",
                                          [tl.zeros([NT], dtype=tl.int32) + s],
                                          dtype=tl.int32, is_pure=False, pack=1)
            return tl.sum(f)  # a CTA barrier: every thread has fenced
        else:
            return 0

    @triton.jit
    def _put(ptrs, val, mask, DET: tl.constexpr):
        """Add a partial sum into the fp32 workspace: a relaxed atomic add, or (DET) a plain store
        into this program's own slot (the caller points ptrs there), summed in a fixed order
        later. Returns what _fenced waits for."""
        if DET:
            tl.store(ptrs, val, mask=mask)
            return val
        else:
            return tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")

    @triton.jit
    def _slot_sum(ptr, n_slots, slot_stride, offs, mask, SLOTS: tl.constexpr):
        """sum_j ptr[j * slot_stride + offs] over j < n_slots, in a fixed order (SLOTS slots per
        step, a tree inside a step, steps in sequence): the deterministic reduction. offs, mask:
        1-D."""
        acc = tl.zeros(offs.shape, dtype=tl.float32)
        for j0 in range(0, n_slots, SLOTS):
            j = j0 + tl.arange(0, SLOTS)
            v = tl.load(ptr + j[:, None] * slot_stride + offs[None, :],
                        mask=(j < n_slots)[:, None] & mask[None, :], other=0.0, cache_modifier=".cg")
            acc += tl.sum(v, axis=0)
        return acc

    @triton.jit
    def _round_out(v, RTNE_FIX: tl.constexpr):
        if RTNE_FIX:
            # the triton interpreter truncates fp32 -> bf16; round to nearest even by hand
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _finish_tile(tok, n, cnt_ptr, expected, ws_ptr, y_ptr, stride_ym, bias_ptr, M, N,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                     RTNE_FIX: tl.constexpr):
        """In-kernel epilogue of column tile n: the program that arrives last at the tile's
        counter (every contributor counts itself in after its partial sums, see _fenced) writes
        y = cast(ws + bias) for the tile, zeroes its ws and resets the counter."""
        old = tl.atomic_add(cnt_ptr + n, tok + 1, sem="acq_rel", scope="gpu")
        if old == expected - 1:
            offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            if M_PAD == 1:
                v = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    v += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                v = _round_out(v, RTNE_FIX)
                tl.store(y_ptr + offs_n, v.to(y_ptr.dtype.element_ty), mask=n_ok)
                tl.store(ws_ptr + offs_n, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_ok)
            else:
                offs_m = tl.arange(0, M_PAD)
                ok = (offs_m < M)[:, None] & n_ok[None, :]
                w_offs = offs_m[:, None] * N + offs_n[None, :]
                v = tl.load(ws_ptr + w_offs, mask=ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    v += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                v = _round_out(v, RTNE_FIX)
                tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                         v.to(y_ptr.dtype.element_ty), mask=ok)
                tl.store(ws_ptr + w_offs, tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), mask=ok)
            tl.store(cnt_ptr + n, 0)

    @triton.jit
    def _load_thr(thr_ptr, thr_val, THR_IS_PTR: tl.constexpr):
        if THR_IS_PTR:
            return tl.load(thr_ptr).to(tl.float32)
        else:
            return thr_val

    @triton.jit
    def _load_x1(x_ptr, scale_ptr, offs_k, k_hi, thr, HAS_SCALE: tl.constexpr):
        """One row: x chunk (BK,) fp32, keep mask, in-range mask."""
        ok = offs_k < k_hi
        xv = tl.load(x_ptr + offs_k, mask=ok, other=0.0, eviction_policy="evict_last")
        xv = xv.to(tl.float32)
        score = tl.abs(xv)
        if HAS_SCALE:
            s = tl.load(scale_ptr + offs_k, mask=ok, other=0.0, eviction_policy="evict_last")
            score = score * s
        keep = (score > thr) & ok
        return xv, keep, ok

    @triton.jit
    def _load_xm(x_ptr, stride_xm, scale_ptr, offs_k, k_hi, M, thr,
                 M_PAD: tl.constexpr, HAS_SCALE: tl.constexpr):
        """M rows: x chunk (M_PAD, BK) fp32, keep mask, in-range mask."""
        k_ok = offs_k < k_hi
        offs_m = tl.arange(0, M_PAD)
        ok = (offs_m < M)[:, None] & k_ok[None, :]
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=ok, other=0.0,
                     eviction_policy="evict_last").to(tl.float32)
        score = tl.abs(xv)
        if HAS_SCALE:
            s = tl.load(scale_ptr + offs_k, mask=k_ok, other=0.0, eviction_policy="evict_last")
            score = score * s[None, :]
        keep = (score > thr) & ok
        return xv, keep, ok

    @triton.jit
    def _mac1(acc, xin, w_ptrs, row_mask, col_mask):
        """acc (BN,) += xin (BK,) @ W[rows, cols]; rows with row_mask False are not fetched."""
        w = tl.load(w_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        return acc + tl.sum(w.to(tl.float32) * xin[:, None], axis=0)

    @triton.jit
    def _macm(acc, xin, w_ptrs, row_mask, col_mask, SPLIT_LO: tl.constexpr,
              DOT_UPCAST: tl.constexpr):
        """acc (M_PAD, BN) += xin (M_PAD, BK) @ W[rows, cols] on the tensor cores.

        SPLIT_LO: xin is genuine fp32 (z): feed it as hi + lo 16-bit parts (~fp32 accurate).
        DOT_UPCAST: do the product in fp32 (the triton interpreter's bf16 dot is wrong)."""
        w = tl.load(w_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        if DOT_UPCAST:
            acc = tl.dot(xin, w.to(tl.float32), acc, input_precision="ieee")
        elif w.dtype == tl.float32:
            acc = tl.dot(xin, w, acc, input_precision="ieee")
        else:
            hi = xin.to(w.dtype)
            acc = tl.dot(hi, w, acc)
            if SPLIT_LO:
                lo = (xin - hi.to(tl.float32)).to(w.dtype)
                acc = tl.dot(lo, w, acc)
        return acc

    # ---------------------------------------------------------------- per-part device code

    @triton.jit
    def _z_part(q, x_ptr, stride_xm, M, K, thr_ptr, thr_val, scale_ptr, down_ptr, stride_dk,
                z_ptr, R, M_PAD: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_R: tl.constexpr,
                THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_UPCAST: tl.constexpr,
                DET: tl.constexpr):
        """z[b, r-tile] += sum over the DROPPED channels of chunk kp of x[b, j] lr_down[j, :]
        (DET: stored into slot kp of z, (n_kp, M, R))."""
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        n_rt = tl.cdiv(R, BLOCK_R)
        rt = q % n_rt
        kp = q // n_rt
        offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_k = kp * BLOCK_KP + tl.arange(0, BLOCK_KP)
        d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :]
        if DET:
            z_ptr += kp * M * R  # this chunk's slot
        if M_PAD == 1:
            xv, keep, ok = _load_x1(x_ptr, scale_ptr, offs_k, K, thr, HAS_SCALE)
            drop = ok & (~keep)
            acc = _mac1(tl.zeros([BLOCK_R], dtype=tl.float32), tl.where(drop, xv, 0.0),
                        d_ptrs, drop, r_ok)
            _put(z_ptr + offs_r, acc, r_ok, DET)
        else:
            offs_m = tl.arange(0, M_PAD)
            xv, keep, ok = _load_xm(x_ptr, stride_xm, scale_ptr, offs_k, K, M, thr, M_PAD,
                                    HAS_SCALE)
            drop = ok & (~keep)
            row_any = tl.max(drop.to(tl.int32), axis=0) > 0
            acc = _macm(tl.zeros([M_PAD, BLOCK_R], dtype=tl.float32), tl.where(drop, xv, 0.0),
                        d_ptrs, row_any, r_ok, False, DOT_UPCAST)
            _put(z_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
                 (offs_m < M)[:, None] & r_ok[None, :], DET)

    @triton.jit
    def _z_release(tok, zcnt_ptr, n_lr, z_ptr, ZN):
        """Count a low-rank program in once it has read z; the last of the n_lr zeroes z (ZN
        floats) for the next call and resets the counter."""
        old = tl.atomic_add(zcnt_ptr, tok + 1, sem="acq_rel", scope="gpu")
        if old == n_lr - 1:
            for z0 in range(0, ZN, 128):
                zo = z0 + tl.arange(0, 128)
                tl.store(z_ptr + zo, tl.zeros([128], dtype=tl.float32), mask=zo < ZN)
            tl.store(zcnt_ptr, 0)

    @triton.jit
    def _lowrank_part(q, up_ptr, stride_ur, z_ptr, ws_ptr, M, N, R, zcnt_ptr, n_lr, n_kp,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                      DOT_UPCAST: tl.constexpr, EPI_TILE: tl.constexpr, NT: tl.constexpr,
                      FENCE: tl.constexpr, DET: tl.constexpr):
        """ws[b, n-tile] += z[b, r-chunk] @ lr_up[r-chunk, n-tile].
        EPI_TILE: the last of the part's n_lr low-rank programs to have read z zeroes it (the
        counter at zcnt_ptr). DET: z is the fixed-order sum of its n_kp slots, and ws_ptr points
        at this program's slot. Returns the token of _fenced for the column tile's counter."""
        n_tiles = tl.cdiv(N, BLOCK_N)
        n = q % n_tiles
        rc = q // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_c = rc * BLOCK_KR + tl.arange(0, BLOCK_KR)
        c_ok = offs_c < R
        up_ptrs = up_ptr + offs_c[:, None] * stride_ur + offs_n[None, :]
        if M_PAD == 1:
            if DET:
                zin = _slot_sum(z_ptr, n_kp, M * R, offs_c, c_ok, 16)
            else:
                zin = tl.load(z_ptr + offs_c, mask=c_ok, other=0.0, cache_modifier=".cg")
            if EPI_TILE:
                _z_release(_fenced(zin, NT, FENCE), zcnt_ptr, n_lr, z_ptr, M * R)
            acc1 = _mac1(tl.zeros([BLOCK_N], dtype=tl.float32), zin, up_ptrs, c_ok, n_ok)
            tok = _fenced(_put(ws_ptr + offs_n, acc1, n_ok, DET), NT, FENCE)
        else:
            offs_m = tl.arange(0, M_PAD)
            m_ok = offs_m < M
            if DET:  # rows one at a time: _slot_sum is 1-D
                zin = tl.zeros([M_PAD, BLOCK_KR], dtype=tl.float32)
                for b in range(0, M):
                    zb = _slot_sum(z_ptr + b * R, n_kp, M * R, offs_c, c_ok, 16)
                    zin = tl.where((offs_m == b)[:, None], zb[None, :], zin)
            else:
                zin = tl.load(z_ptr + offs_m[:, None] * R + offs_c[None, :],
                              mask=m_ok[:, None] & c_ok[None, :], other=0.0, cache_modifier=".cg")
            if EPI_TILE:
                _z_release(_fenced(zin, NT, FENCE), zcnt_ptr, n_lr, z_ptr, M * R)
            acc = _macm(tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), zin, up_ptrs, c_ok, n_ok,
                        True, DOT_UPCAST)
            tok = _fenced(_put(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                               m_ok[:, None] & n_ok[None, :], DET), NT, FENCE)
        return tok

    @triton.jit
    def _lowrank_fused_part(q, x_ptr, stride_xm, M, K, thr_ptr, thr_val, scale_ptr, down_ptr,
                            stride_dk, up_ptr, stride_ur, ws_ptr, N, R,
                            M_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KP: tl.constexpr,
                            LR_KS: tl.constexpr, LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr,
                            THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                            DOT_UPCAST: tl.constexpr):
        """Low-rank term without a z pass (LR_FUSED): the term is linear in the K-slices, so the
        program (r-tile rt, K-slice s, column group ng) computes the partial z of its slice's
        dropped channels and at once multiplies it by lr_up[rt, group] (loop over BLOCK_NL
        columns), adding into ws. No dependency on any other program."""
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        n_rt = tl.cdiv(R, BLOCK_R)
        n_s = tl.cdiv(K, LR_KS)
        rt = q % n_rt
        rest = q // n_rt
        s = rest % n_s
        ng = rest // n_s
        offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        n_per = tl.cdiv(tl.cdiv(N, LR_NG), BLOCK_NL) * BLOCK_NL
        n_lo = ng * n_per
        n_hi = tl.minimum(n_lo + n_per, N)
        if M_PAD == 1:
            zacc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for it in tl.static_range(LR_KS // BLOCK_KP):
                offs_k = s * LR_KS + it * BLOCK_KP + tl.arange(0, BLOCK_KP)
                xv, keep, ok = _load_x1(x_ptr, scale_ptr, offs_k, K, thr, HAS_SCALE)
                drop = ok & (~keep)
                zacc = _mac1(zacc, tl.where(drop, xv, 0.0),
                             down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :], drop, r_ok)
            for n0 in range(n_lo, n_hi, BLOCK_NL):
                offs_n = n0 + tl.arange(0, BLOCK_NL)
                n_ok = offs_n < n_hi
                acc = _mac1(tl.zeros([BLOCK_NL], dtype=tl.float32), zacc,
                            up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :], r_ok, n_ok)
                tl.atomic_add(ws_ptr + offs_n, acc, mask=n_ok, sem="relaxed")
        else:
            offs_m = tl.arange(0, M_PAD)
            m_ok = offs_m < M
            zacc = tl.zeros([M_PAD, BLOCK_R], dtype=tl.float32)
            for it in tl.static_range(LR_KS // BLOCK_KP):
                offs_k = s * LR_KS + it * BLOCK_KP + tl.arange(0, BLOCK_KP)
                xv, keep, ok = _load_xm(x_ptr, stride_xm, scale_ptr, offs_k, K, M, thr, M_PAD,
                                        HAS_SCALE)
                drop = ok & (~keep)
                row_any = tl.max(drop.to(tl.int32), axis=0) > 0
                zacc = _macm(zacc, tl.where(drop, xv, 0.0),
                             down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :], row_any,
                             r_ok, False, DOT_UPCAST)
            for n0 in range(n_lo, n_hi, BLOCK_NL):
                offs_n = n0 + tl.arange(0, BLOCK_NL)
                n_ok = offs_n < n_hi
                acc = _macm(tl.zeros([M_PAD, BLOCK_NL], dtype=tl.float32), zacc,
                            up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :], r_ok, n_ok,
                            True, DOT_UPCAST)
                tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                              mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")

    @triton.jit
    def _lowrank_any_part(q, x_ptr, stride_xm, M, K, thr_ptr, thr_val, scale_ptr, down_ptr,
                          stride_dk, up_ptr, stride_ur, z_ptr, ws_ptr, N, R, zcnt_ptr, n_lr,
                          M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_KP: tl.constexpr, LR_KS: tl.constexpr,
                          LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr, LR_FUSED: tl.constexpr,
                          THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                          DOT_UPCAST: tl.constexpr, EPI_TILE: tl.constexpr, NT: tl.constexpr,
                          FENCE: tl.constexpr, DET: tl.constexpr):
        """The part's low-rank program q; returns the token of _fenced (0 for LR_FUSED, which
        runs with the epilogue launch)."""
        tok = 0
        if LR_FUSED:
            _lowrank_fused_part(q, x_ptr, stride_xm, M, K, thr_ptr, thr_val, scale_ptr, down_ptr,
                                stride_dk, up_ptr, stride_ur, ws_ptr, N, R, M_PAD, BLOCK_R,
                                BLOCK_KP, LR_KS, LR_NG, BLOCK_NL, THR_IS_PTR, HAS_SCALE,
                                DOT_UPCAST)
        else:
            tok = _lowrank_part(q, up_ptr, stride_ur, z_ptr, ws_ptr, M, N, R, zcnt_ptr, n_lr,
                                tl.cdiv(K, BLOCK_KP), M_PAD, BLOCK_N, BLOCK_KR, DOT_UPCAST,
                                EPI_TILE, NT, FENCE, DET)
        return tok

    @triton.jit
    def _sparse_plain_part(q, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr, scale_ptr, ws_ptr,
                           N, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           K_ITERS: tl.constexpr, HAS_SCALE: tl.constexpr,
                           DOT_UPCAST: tl.constexpr, NT: tl.constexpr, FENCE: tl.constexpr,
                           DET: tl.constexpr):
        """Tile (n, kc): row tiles of w_t loaded predicated on the mask (TEAL-style: dropped
        rows cost no traffic, but the tile arithmetic runs over every row)."""
        n_tiles = tl.cdiv(N, BLOCK_N)
        n = q % n_tiles
        kc = q // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if M_PAD == 1:
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for it in tl.static_range(K_ITERS):
                offs_k = (kc * K_ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
                xv, keep, ok = _load_x1(x_ptr, scale_ptr, offs_k, K, thr, HAS_SCALE)
                acc1 = _mac1(acc1, tl.where(keep, xv, 0.0),
                             w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], keep, n_ok)
            tok = _fenced(_put(ws_ptr + offs_n, acc1, n_ok, DET), NT, FENCE)
        else:
            offs_m = tl.arange(0, M_PAD)
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            for it in tl.static_range(K_ITERS):
                offs_k = (kc * K_ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
                xv, keep, ok = _load_xm(x_ptr, stride_xm, scale_ptr, offs_k, K, M, thr, M_PAD,
                                        HAS_SCALE)
                row_any = tl.max(keep.to(tl.int32), axis=0) > 0
                acc = _macm(acc, tl.where(keep, xv, 0.0),
                            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                            row_any, n_ok, False, DOT_UPCAST)
            tok = _fenced(_put(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                               (offs_m < M)[:, None] & n_ok[None, :], DET), NT, FENCE)
        return tok

    @triton.jit
    def _group_select(g0, pos_k, offs_c, xc, cnt, G: tl.constexpr):
        """Channels (and x values) of kept ranks g0 .. g0+G-1 of a chunk, from registers."""
        ranks = g0 + tl.arange(0, G)
        sel = pos_k[None, :] == ranks[:, None]  # (G, CH), at most one match per row
        rows = tl.sum(tl.where(sel, offs_c[None, :], 0), axis=1)
        xg = tl.sum(tl.where(sel, xc[None, :], 0.0), axis=1)
        return rows, xg, ranks < cnt

    @triton.jit
    def _sparse_compact_part(q, slot_ptr, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr,
                             scale_ptr, ws_ptr, N, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                             CH: tl.constexpr, G: tl.constexpr, HAS_SCALE: tl.constexpr,
                             DYN: tl.constexpr, REGIDX: tl.constexpr, DOT_UPCAST: tl.constexpr,
                             NT: tl.constexpr, FENCE: tl.constexpr, DET: tl.constexpr):
        """Tile (n, kc) over the KEPT rows only: the program compacts its chunk's kept channels
        into its own scratch slot (cumsum + scatter; no other program touches the slot), then
        walks them G at a time: dropped rows cost neither traffic nor arithmetic.
        DYN: a run-time loop over ceil(count / G) groups (software-pipelined by triton when
        num_stages > 1) instead of CH / G unrolled groups each behind an `if`.
        REGIDX (batch 1): no slot; each group's row indices and x values are selected from the
        registers holding the chunk (a (G, CH) match against the cumsum), and the loop keeps
        the next group's weight tile in flight while it multiplies the current one."""
        n_tiles = tl.cdiv(N, BLOCK_N)
        n = q % n_tiles
        kc = q // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_c = kc * CH + tl.arange(0, CH)
        if M_PAD == 1:
            xc, keepc, okc = _load_x1(x_ptr, scale_ptr, offs_c, K, thr, HAS_SCALE)
            kany = keepc.to(tl.int32)
        else:
            xcm, keepcm, okcm = _load_xm(x_ptr, stride_xm, scale_ptr, offs_c, K, M, thr, M_PAD,
                                         HAS_SCALE)
            kany = tl.max(keepcm.to(tl.int32), axis=0)  # union over the batch rows
        pos = tl.cumsum(kany, 0) - 1
        cnt = tl.sum(kany, 0)
        if REGIDX and M_PAD == 1:
            # rank j of the group <-> the channel whose cumsum position is g0 + j
            pos_k = tl.where(kany > 0, pos, -1)
            acc2 = tl.zeros([G, BLOCK_N], dtype=tl.float32)
            rows, xg, r_ok = _group_select(0, pos_k, offs_c, xc, cnt, G)
            w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0,
                        eviction_policy="evict_first")
            for g0 in range(G, cnt + G, G):
                rows_n, xg_n, r_ok_n = _group_select(g0, pos_k, offs_c, xc, cnt, G)
                w_n = tl.load(w_ptr + rows_n[:, None] * stride_wk + offs_n[None, :],
                              mask=r_ok_n[:, None] & n_ok[None, :], other=0.0,
                              eviction_policy="evict_first")
                acc2 += w.to(tl.float32) * xg[:, None]
                w = w_n
                xg = xg_n
            tok = _fenced(_put(ws_ptr + offs_n, tl.sum(acc2, axis=0), n_ok, DET), NT, FENCE)
        else:
            tl.store(slot_ptr + pos, offs_c, mask=kany > 0)
            # the slot is written and read back by different threads of this program: a CTA
            # barrier orders global stores before loads within the CTA (same SM, same L1)
            tl.debug_barrier()
            if M_PAD == 1:
                # (G, BN) accumulator: one FMA per loaded element, one reduction at the end
                acc2 = tl.zeros([G, BLOCK_N], dtype=tl.float32)
                if DYN:
                    for g0 in range(0, cnt, G):
                        r = g0 + tl.arange(0, G)
                        r_ok = r < cnt
                        rows = tl.load(slot_ptr + r, mask=r_ok, other=0)
                        xv = tl.load(x_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
                        w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                                    mask=r_ok[:, None] & n_ok[None, :], other=0.0,
                                    eviction_policy="evict_first")
                        acc2 += w.to(tl.float32) * xv[:, None]
                else:
                    for g in tl.static_range(CH // G):
                        if g * G < cnt:
                            r = g * G + tl.arange(0, G)
                            r_ok = r < cnt
                            rows = tl.load(slot_ptr + r, mask=r_ok, other=0)
                            xv = tl.load(x_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
                            w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                                        mask=r_ok[:, None] & n_ok[None, :], other=0.0,
                                        eviction_policy="evict_first")
                            acc2 += w.to(tl.float32) * xv[:, None]
                tok = _fenced(_put(ws_ptr + offs_n, tl.sum(acc2, axis=0), n_ok, DET), NT, FENCE)
            else:
                offs_m = tl.arange(0, M_PAD)
                m_ok = offs_m < M
                acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
                for g in tl.static_range(CH // G):
                    if g * G < cnt:
                        r = g * G + tl.arange(0, G)
                        r_ok = r < cnt
                        rows = tl.load(slot_ptr + r, mask=r_ok, other=0)
                        ok = m_ok[:, None] & r_ok[None, :]
                        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=ok,
                                     other=0.0).to(tl.float32)
                        score = tl.abs(xv)
                        if HAS_SCALE:
                            sc = tl.load(scale_ptr + rows, mask=r_ok, other=0.0)
                            score = score * sc[None, :]
                        keep = (score > thr) & ok  # per-row semantics inside the union
                        acc = _macm(acc, tl.where(keep, xv, 0.0),
                                    w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                                    r_ok, n_ok, False, DOT_UPCAST)
                tok = _fenced(_put(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                                   m_ok[:, None] & n_ok[None, :], DET), NT, FENCE)
        return tok

    @triton.jit
    def _sparse_part(q, slot_ptr, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr_ptr, thr_val,
                     scale_ptr, ws_ptr, N, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, CH: tl.constexpr,
                     G: tl.constexpr, COMPACT: tl.constexpr, DYN: tl.constexpr,
                     REGIDX: tl.constexpr, THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, NT: tl.constexpr, FENCE: tl.constexpr,
                     DET: tl.constexpr):
        """The part's sparse program q; returns the token of _fenced."""
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        if COMPACT:
            tok = _sparse_compact_part(q, slot_ptr, x_ptr, stride_xm, M, K, w_ptr, stride_wk,
                                       thr, scale_ptr, ws_ptr, N, M_PAD, BLOCK_N, CH, G,
                                       HAS_SCALE, DYN, REGIDX, DOT_UPCAST, NT, FENCE, DET)
        else:
            tok = _sparse_plain_part(q, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr, scale_ptr,
                                     ws_ptr, N, M_PAD, BLOCK_N, BLOCK_K, K_ITERS, HAS_SCALE,
                                     DOT_UPCAST, NT, FENCE, DET)
        return tok

    @triton.jit
    def _epilogue_part(q, b, ws_ptr, y_ptr, stride_ym, bias_ptr, N, n_slots,
                       BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr, RTNE_FIX: tl.constexpr,
                       DET: tl.constexpr):
        """y[b, block] = cast(ws[b, block] + bias); ws[b, block] = 0. DET: ws holds n_slots
        partial sums (n_slots, M, N), added in a fixed order, and every call rewrites them."""
        offs = q * BLOCK_E + tl.arange(0, BLOCK_E)
        ok = offs < N
        if DET:
            v = _slot_sum(ws_ptr + b * N, n_slots, tl.num_programs(1) * N, offs, ok, 8)
        else:
            v = tl.load(ws_ptr + b * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            v += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = _round_out(v, RTNE_FIX)
        tl.store(y_ptr + b * stride_ym + offs, v.to(y_ptr.dtype.element_ty), mask=ok)
        if not DET:
            tl.store(ws_ptr + b * N + offs, tl.zeros([BLOCK_E], dtype=tl.float32), mask=ok)

    @triton.jit
    def _split_part(xv, offs, ok, b, thr_ptr, thr_val, scale_ptr, xk_ptr, xd_ptr, K,
                    THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LR: tl.constexpr):
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        score = tl.abs(xv.to(tl.float32))
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + offs, mask=ok, other=0.0)
        keep = score > thr
        tl.store(xk_ptr + b * K + offs, tl.where(keep, xv, 0.0).to(xk_ptr.dtype.element_ty),
                 mask=ok)
        if HAS_LR:
            tl.store(xd_ptr + b * K + offs, tl.where(keep, 0.0, xv).to(xd_ptr.dtype.element_ty),
                     mask=ok)

    # ---------------------------------------------------------------- kernels (1-3 parts)
    # Per-part arguments carry the part's index as a suffix (w0, w1, w2, ...); program ids are
    # split into contiguous ranges per part (ends ZE*/LE*/SE*/EE*, computed on the host). Parts
    # beyond NUM_PARTS are never compiled.

    @triton.jit
    def _z_kernel(x_ptr, stride_xm, M, K, z_ptr,
                  thr0, tv0, sc0, dn0, sdn0, R0, zo0, ZE0,
                  thr1, tv1, sc1, dn1, sdn1, R1, zo1, ZE1,
                  thr2, tv2, sc2, dn2, sdn2, R2, zo2,
                  TP0: tl.constexpr, HS0: tl.constexpr, HL0: tl.constexpr,
                  TP1: tl.constexpr, HS1: tl.constexpr, HL1: tl.constexpr,
                  TP2: tl.constexpr, HS2: tl.constexpr, HL2: tl.constexpr,
                  NUM_PARTS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_KP: tl.constexpr,
                  BLOCK_R: tl.constexpr, DOT_UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
                  DET: tl.constexpr):
        _pdl_wait(USE_PDL)  # x, the threshold and the zeroed z come from earlier grids
        _pdl_release(USE_PDL)
        pid = tl.program_id(0)
        if pid < ZE0:
            if HL0:
                _z_part(pid, x_ptr, stride_xm, M, K, thr0, tv0, sc0, dn0, sdn0, z_ptr + zo0, R0,
                        M_PAD, BLOCK_KP, BLOCK_R, TP0, HS0, DOT_UPCAST, DET)
        elif pid < ZE1:
            if NUM_PARTS > 1:
                if HL1:
                    _z_part(pid - ZE0, x_ptr, stride_xm, M, K, thr1, tv1, sc1, dn1, sdn1,
                            z_ptr + zo1, R1, M_PAD, BLOCK_KP, BLOCK_R, TP1, HS1, DOT_UPCAST,
                            DET)
        else:
            if NUM_PARTS > 2:
                if HL2:
                    _z_part(pid - ZE1, x_ptr, stride_xm, M, K, thr2, tv2, sc2, dn2, sdn2,
                            z_ptr + zo2, R2, M_PAD, BLOCK_KP, BLOCK_R, TP2, HS2, DOT_UPCAST,
                            DET)

    @triton.jit
    def _own_slot(ws_ptr, first, q, M, N, BLOCK_N: tl.constexpr, DET: tl.constexpr):
        """Where program q (column tile q % tiles, chunk q // tiles) puts its partial sums: DET,
        its own workspace slot first + chunk of (M, N) floats; else the shared ws (atomics)."""
        if DET:
            ws_ptr += (first + q // tl.cdiv(N, BLOCK_N)) * M * N
        return ws_ptr

    @triton.jit
    def _lowrank_tile(q, x_ptr, stride_xm, M, K, thr, tv, sc, dn, sdn, up, sup, z_ptr, ws_ptr,
                      N, R, cnt_ptr, ex, zcnt_ptr, n_lr, y_ptr, sy, b_ptr, n_kc,
                      TP: tl.constexpr, HS: tl.constexpr, HB: tl.constexpr,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_KP: tl.constexpr, LR_KS: tl.constexpr,
                      LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr, LR_FUSED: tl.constexpr,
                      DOT_UPCAST: tl.constexpr, EPI_TILE: tl.constexpr, NT: tl.constexpr,
                      FENCE: tl.constexpr, RTNE_FIX: tl.constexpr, DET: tl.constexpr):
        """Low-rank program q of a part, then (EPI_TILE) its column tile's arrival. DET: its
        partial sums go to workspace slot n_kc + (its rank chunk)."""
        ws_out = _own_slot(ws_ptr, n_kc, q, M, N, BLOCK_N, DET)
        tok = _lowrank_any_part(q, x_ptr, stride_xm, M, K, thr, tv, sc, dn, sdn, up, sup, z_ptr,
                                ws_out, N, R, zcnt_ptr, n_lr, M_PAD, BLOCK_N, BLOCK_KR, BLOCK_R,
                                BLOCK_KP, LR_KS, LR_NG, BLOCK_NL, LR_FUSED, TP, HS, DOT_UPCAST,
                                EPI_TILE, NT, FENCE, DET)
        if EPI_TILE:
            _finish_tile(tok, q % tl.cdiv(N, BLOCK_N), cnt_ptr, ex, ws_ptr, y_ptr, sy, b_ptr, M,
                         N, M_PAD, BLOCK_N, HB, RTNE_FIX)

    @triton.jit
    def _sparse_tile(q, slot, x_ptr, stride_xm, M, K, w, sw, thr, tv, sc, ws_ptr, N,
                     cnt_ptr, ex, y_ptr, sy, b_ptr,
                     TP: tl.constexpr, HS: tl.constexpr, HB: tl.constexpr,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                     COMPACT: tl.constexpr, DYN: tl.constexpr, REGIDX: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, EPI_TILE: tl.constexpr, NT: tl.constexpr,
                     FENCE: tl.constexpr, RTNE_FIX: tl.constexpr, DET: tl.constexpr):
        """Sparse program q of a part, then (EPI_TILE) its column tile's arrival. DET: its
        partial sums go to workspace slot (its input chunk)."""
        ws_out = _own_slot(ws_ptr, 0, q, M, N, BLOCK_N, DET)
        tok = _sparse_part(q, slot, x_ptr, stride_xm, M, K, w, sw, thr, tv, sc, ws_out, N, M_PAD,
                           BLOCK_N, BLOCK_K, K_ITERS, CH, G, COMPACT, DYN, REGIDX, TP, HS,
                           DOT_UPCAST, NT, FENCE, DET)
        if EPI_TILE:
            _finish_tile(tok, q % tl.cdiv(N, BLOCK_N), cnt_ptr, ex, ws_ptr, y_ptr, sy, b_ptr, M,
                         N, M_PAD, BLOCK_N, HB, RTNE_FIX)

    @triton.jit
    def _main_kernel(x_ptr, stride_xm, M, K, ws_ptr, z_ptr, slot_ptr, cnt_ptr, n_kc,
                     w0, sw0, thr0, tv0, sc0, dn0, sdn0, up0, sup0, N0, R0, wo0, zo0,
                     y0, sy0, b0, co0, ex0, zc0, nl0, LE0, SE0,
                     w1, sw1, thr1, tv1, sc1, dn1, sdn1, up1, sup1, N1, R1, wo1, zo1,
                     y1, sy1, b1, co1, ex1, zc1, nl1, LE1, SE1,
                     w2, sw2, thr2, tv2, sc2, dn2, sdn2, up2, sup2, N2, R2, wo2, zo2,
                     y2, sy2, b2, co2, ex2, zc2, nl2, LE2,
                     TP0: tl.constexpr, HS0: tl.constexpr, HL0: tl.constexpr,
                     TP1: tl.constexpr, HS1: tl.constexpr, HL1: tl.constexpr,
                     TP2: tl.constexpr, HS2: tl.constexpr, HL2: tl.constexpr,
                     HB0: tl.constexpr, HB1: tl.constexpr, HB2: tl.constexpr,
                     NUM_PARTS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, BLOCK_KR: tl.constexpr,
                     CH: tl.constexpr, G: tl.constexpr, COMPACT: tl.constexpr,
                     DYN: tl.constexpr, REGIDX: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_KP: tl.constexpr, LR_KS: tl.constexpr,
                     LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr, LR_FUSED: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, USE_PDL: tl.constexpr, AFTER_Z: tl.constexpr,
                     EPI_TILE: tl.constexpr, NT: tl.constexpr, FENCE: tl.constexpr,
                     RTNE_FIX: tl.constexpr, DET: tl.constexpr):
        """[low-rank tiles p0 | p1 | p2][sparse tiles p0 | p1 | p2]; fp32 partials -> ws.
        EPI_TILE: the last program to finish a column tile writes y for it (per-part counters
        from cnt_ptr + co_p, ex_p programs per tile; z counters at cnt_ptr + zc_p, nl_p
        low-rank programs)."""
        pid = tl.program_id(0)
        if pid < LE2:
            # low-rank tiles read z, written by the z kernel just before (or, LR_FUSED, x and
            # the zeroed ws, written earlier): wait for the preceding grid
            _pdl_wait(USE_PDL)
            _pdl_release(USE_PDL)
            if pid < LE0:
                if HL0:
                    _lowrank_tile(pid, x_ptr, stride_xm, M, K, thr0, tv0, sc0, dn0, sdn0, up0,
                                  sup0, z_ptr + zo0, ws_ptr + wo0, N0, R0, cnt_ptr + co0, ex0,
                                  cnt_ptr + zc0, nl0, y0, sy0, b0, n_kc, TP0, HS0, HB0, M_PAD,
                                  BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP, LR_KS, LR_NG, BLOCK_NL,
                                  LR_FUSED, DOT_UPCAST, EPI_TILE, NT, FENCE, RTNE_FIX, DET)
            elif pid < LE1:
                if NUM_PARTS > 1:
                    if HL1:
                        _lowrank_tile(pid - LE0, x_ptr, stride_xm, M, K, thr1, tv1, sc1, dn1,
                                      sdn1, up1, sup1, z_ptr + zo1, ws_ptr + wo1, N1, R1,
                                      cnt_ptr + co1, ex1, cnt_ptr + zc1, nl1, y1, sy1, b1, n_kc, TP1,
                                      HS1, HB1, M_PAD, BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP,
                                      LR_KS, LR_NG, BLOCK_NL, LR_FUSED, DOT_UPCAST, EPI_TILE, NT,
                                      FENCE, RTNE_FIX, DET)
            else:
                if NUM_PARTS > 2:
                    if HL2:
                        _lowrank_tile(pid - LE1, x_ptr, stride_xm, M, K, thr2, tv2, sc2, dn2,
                                      sdn2, up2, sup2, z_ptr + zo2, ws_ptr + wo2, N2, R2,
                                      cnt_ptr + co2, ex2, cnt_ptr + zc2, nl2, y2, sy2, b2, n_kc, TP2,
                                      HS2, HB2, M_PAD, BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP,
                                      LR_KS, LR_NG, BLOCK_NL, LR_FUSED, DOT_UPCAST, EPI_TILE, NT,
                                      FENCE, RTNE_FIX, DET)
        else:
            # Sparse tiles read x, the thresholds and the zeroed ws, all written before the
            # grid that precedes this one. Without a z kernel in between, that grid may still be
            # running: wait. After the z kernel, they are complete (the z kernel waited for them
            # before it released this grid), so these tiles overlap the z kernel.
            if not AFTER_Z:
                _pdl_wait(USE_PDL)
            _pdl_release(USE_PDL)
            q = pid - LE2
            slot = slot_ptr + q * CH
            if q < SE0:
                _sparse_tile(q, slot, x_ptr, stride_xm, M, K, w0, sw0, thr0, tv0, sc0,
                             ws_ptr + wo0, N0, cnt_ptr + co0, ex0, y0, sy0, b0, TP0, HS0, HB0,
                             M_PAD, BLOCK_N, BLOCK_K, K_ITERS, CH, G, COMPACT, DYN, REGIDX,
                             DOT_UPCAST, EPI_TILE, NT, FENCE, RTNE_FIX, DET)
            elif q < SE1:
                if NUM_PARTS > 1:
                    _sparse_tile(q - SE0, slot, x_ptr, stride_xm, M, K, w1, sw1, thr1, tv1, sc1,
                                 ws_ptr + wo1, N1, cnt_ptr + co1, ex1, y1, sy1, b1, TP1, HS1,
                                 HB1, M_PAD, BLOCK_N, BLOCK_K, K_ITERS, CH, G, COMPACT, DYN,
                                 REGIDX, DOT_UPCAST, EPI_TILE, NT, FENCE, RTNE_FIX, DET)
            else:
                if NUM_PARTS > 2:
                    _sparse_tile(q - SE1, slot, x_ptr, stride_xm, M, K, w2, sw2, thr2, tv2, sc2,
                                 ws_ptr + wo2, N2, cnt_ptr + co2, ex2, y2, sy2, b2, TP2, HS2,
                                 HB2, M_PAD, BLOCK_N, BLOCK_K, K_ITERS, CH, G, COMPACT, DYN,
                                 REGIDX, DOT_UPCAST, EPI_TILE, NT, FENCE, RTNE_FIX, DET)

    @triton.jit
    def _epilogue_kernel(ws_ptr, z_ptr, ZN,
                         y0, sy0, b0, N0, wo0, ns0, EE0,
                         y1, sy1, b1, N1, wo1, ns1, EE1,
                         y2, sy2, b2, N2, wo2, ns2,
                         HB0: tl.constexpr, HB1: tl.constexpr, HB2: tl.constexpr,
                         NUM_PARTS: tl.constexpr, BLOCK_E: tl.constexpr,
                         RTNE_FIX: tl.constexpr, USE_PDL: tl.constexpr, DET: tl.constexpr):
        """grid (EE_last, M): y_p = cast(ws_p + bias_p); ws = 0; z = 0 (ZN floats; DET: 0)."""
        _pdl_wait(USE_PDL)  # every partial sum of the main grid has landed
        _pdl_release(USE_PDL)
        pid = tl.program_id(0)
        b = tl.program_id(1)
        if pid < EE0:
            _epilogue_part(pid, b, ws_ptr + wo0, y0, sy0, b0, N0, ns0, BLOCK_E, HB0, RTNE_FIX,
                           DET)
        elif pid < EE1:
            if NUM_PARTS > 1:
                _epilogue_part(pid - EE0, b, ws_ptr + wo1, y1, sy1, b1, N1, ns1, BLOCK_E, HB1,
                               RTNE_FIX, DET)
        else:
            if NUM_PARTS > 2:
                _epilogue_part(pid - EE1, b, ws_ptr + wo2, y2, sy2, b2, N2, ns2, BLOCK_E, HB2,
                               RTNE_FIX, DET)
        if b == 0:
            step = tl.num_programs(0) * BLOCK_E
            for z0 in range(pid * BLOCK_E, ZN, step):
                zo = z0 + tl.arange(0, BLOCK_E)
                tl.store(z_ptr + zo, tl.zeros([BLOCK_E], dtype=tl.float32), mask=zo < ZN)

    @triton.jit
    def _split_input_kernel(x_ptr, stride_xm, K,
                            thr0, tv0, sc0, xk0, xd0,
                            thr1, tv1, sc1, xk1, xd1,
                            thr2, tv2, sc2, xk2, xd2,
                            TP0: tl.constexpr, HS0: tl.constexpr, HL0: tl.constexpr,
                            TP1: tl.constexpr, HS1: tl.constexpr, HL1: tl.constexpr,
                            TP2: tl.constexpr, HS2: tl.constexpr, HL2: tl.constexpr,
                            NUM_PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """cuBLAS path: xk_p = x * m_p, xd_p = x * (1 - m_p) (x's dtype), grid (cdiv(K), M)."""
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < K
        xv = tl.load(x_ptr + b * stride_xm + offs, mask=ok, other=0.0)
        _split_part(xv, offs, ok, b, thr0, tv0, sc0, xk0, xd0, K, TP0, HS0, HL0)
        if NUM_PARTS > 1:
            _split_part(xv, offs, ok, b, thr1, tv1, sc1, xk1, xd1, K, TP1, HS1, HL1)
        if NUM_PARTS > 2:
            _split_part(xv, offs, ok, b, thr2, tv2, sc2, xk2, xd2, K, TP2, HS2, HL2)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

def _batch_class(M: int) -> str:
    """Config classes by rows: the union of kept rows (and so the best path) grows with M."""
    return "m1" if M == 1 else "m2" if M == 2 else "m4" if M <= 4 else "m8"


# Base tile configs: one row (FMA) and several rows (tl.dot, batch padded to 16).
_DEFAULT_CONFIGS = {
    "m1": dict(BLOCK_N=256, BLOCK_K=64, K_ITERS=1, num_warps=4, num_stages=1),
    "mm": dict(BLOCK_N=128, BLOCK_K=64, K_ITERS=1, num_warps=4, num_stages=1),
}
# z kernel (lr_down) and low-rank tile (lr_up rows) shapes, epilogue block.
_LR_DEFAULTS = dict(BLOCK_KP=32, BLOCK_R=128, BLOCK_KR=0, Z_WARPS=4, BLOCK_E=512)  # KR 0: = BLOCK_K
# LR_FUSED: no z kernel; low-rank programs (r-tile, K-slice of LR_KS channels, one of LR_NG
# column groups) multiply their partial z straight into lr_up, BLOCK_NL columns at a time.
_LR_FUSED_DEFAULTS = dict(LR_FUSED=False, LR_KS=512, LR_NG=4, BLOCK_NL=128)
# COMPACT: each sparse program compacts its chunk's kept channels (CH per chunk) and walks them
# G at a time. M1_DOT: batch-1 also uses the tensor-core (tl.dot) path. PDL: programmatic
# dependent launch between the kernels of a call (GPU only). PATH "cublas": split x, then cuBLAS.
# EPI "launch": the epilogue kernel; "tile": the last program to finish a column tile writes y
# (per-tile counters, no epilogue launch; correct, but measured 1.1-1.6x slower per call on the
# H200 in CUDA graphs: docs/kernel-notes.md, v5). LR_FUSED always uses the launch.
# DET: deterministic sums (set when torch.use_deterministic_algorithms(True) is on): every
# program stores its partial sums in its own slot and the epilogue (and, for z, the low-rank
# programs) adds the slots in a fixed order, so a call gives the same bits every time; with
# the epilogue launch and without LR_FUSED.
_MODE_DEFAULTS = dict(COMPACT=False, CH=128, G=16, DYN=False, REGIDX=False, M1_DOT=False,
                      PDL=True, PATH="triton", EPI="launch", DET=False)

_CMP_FMA = dict(COMPACT=True, BLOCK_N=512, CH=128, G=8, BLOCK_KR=64, num_warps=4)
_CMP_FMA_DYN = dict(_CMP_FMA, DYN=True, num_stages=2)
_CMP_REG = dict(_CMP_FMA, REGIDX=True)
_PLAIN_DOT = dict(M1_DOT=True, BLOCK_N=128, BLOCK_K=64, num_warps=4)
_MM_128 = dict(BLOCK_N=128, BLOCK_K=64, num_warps=4)
_MM_256X2 = dict(BLOCK_N=256, BLOCK_K=64, K_ITERS=2, num_warps=8)
_CUBLAS = dict(PATH="cublas")
# Per-shape choices for 16-bit dtypes: (class, in, out) -> config, where out is the sum over the
# parts of a multi call and class is m1 / m2 / m4 / m8 (batch 1, 2, 3-4, 5-8: the union of the
# rows' masks grows with the batch and decides whether the sparse kernel still pays), with a
# "+lr" suffix for calls with a low-rank term (R-Sparse) where those measured best with another
# config. PATH "cublas" marks the shape/batch classes where every sparse-kernel variant measured
# slower than the cuBLAS path (split x, then cuBLAS). Entries are the per-op winners of
# `rsparse bench kernel --tune` on the H200, 2026-11-30 (torch 2.11, triton 3.6, bf16,
# s = 0.5, rho = 0.9, i.i.d. Laplace inputs: union of kept rows 75% / 94% / 99.6% at batch
# 2 / 4 / 8); docs/kernel-notes.md, run 2. Unlisted shapes use _default_16bit.
_CONFIG_TABLE: dict = {
    # Llama-2-7B q/k/v/o
    ("m1", 4096, 4096): _CMP_REG,
    ("m1+lr", 4096, 4096): dict(_CMP_REG, BLOCK_KR=32),
    ("m2", 4096, 4096): _MM_256X2,
    ("m2+lr", 4096, 4096): _MM_128,
    ("m4", 4096, 4096): _CUBLAS,
    ("m4+lr", 4096, 4096): _MM_128,
    ("m8", 4096, 4096): _CUBLAS,
    ("m8+lr", 4096, 4096): _MM_128,
    # Llama-2-7B gate/up, down
    ("m1", 4096, 11008): _CMP_FMA,
    ("m1+lr", 4096, 11008): _CMP_FMA_DYN,
    ("m2", 4096, 11008): _CUBLAS,
    ("m2+lr", 4096, 11008): _MM_128,
    ("m4", 4096, 11008): _CUBLAS,
    ("m4+lr", 4096, 11008): _MM_256X2,
    ("m8", 4096, 11008): _CUBLAS,
    ("m8+lr", 4096, 11008): _MM_256X2,
    ("m1", 11008, 4096): _CMP_FMA,
    ("m1+lr", 11008, 4096): _CMP_FMA_DYN,
    ("m2", 11008, 4096): _CUBLAS,
    ("m2+lr", 11008, 4096): _MM_256X2,
    ("m4", 11008, 4096): _CUBLAS,
    ("m4+lr", 11008, 4096): _MM_256X2,
    ("m8", 11008, 4096): _CUBLAS,
    ("m8+lr", 11008, 4096): _MM_256X2,
    # Llama-3-8B gate/up, down, k/v
    ("m1", 4096, 14336): _CMP_FMA,
    ("m1+lr", 4096, 14336): dict(_CMP_FMA, BLOCK_KR=16),
    ("m2", 4096, 14336): _CUBLAS,
    ("m2+lr", 4096, 14336): _MM_256X2,
    ("m4", 4096, 14336): _CUBLAS,
    ("m4+lr", 4096, 14336): _MM_256X2,
    ("m8", 4096, 14336): _CUBLAS,
    ("m8+lr", 4096, 14336): _MM_256X2,
    ("m1", 14336, 4096): _CMP_FMA,
    ("m1+lr", 14336, 4096): _CMP_FMA_DYN,
    ("m2", 14336, 4096): _CUBLAS,
    ("m2+lr", 14336, 4096): _MM_256X2,
    ("m4", 14336, 4096): _CUBLAS,
    ("m4+lr", 14336, 4096): _MM_256X2,
    ("m8", 14336, 4096): _CUBLAS,
    ("m8+lr", 14336, 4096): _MM_256X2,
    ("m1", 4096, 1024): _PLAIN_DOT,
    ("m1+lr", 4096, 1024): dict(_PLAIN_DOT, BLOCK_KR=64),
    ("m2", 4096, 1024): _MM_128,
    ("m4", 4096, 1024): _MM_128,
    ("m8", 4096, 1024): _MM_128,
    # fused groups (rsparse_decode_linear_multi): Llama-2 q/k/v 3 x 4096, gate+up 2 x 11008;
    # Llama-3 q/k/v 4096 + 2 x 1024, gate+up 2 x 14336. Batch 1 from the sweep; at batch 2-8
    # the q/k/v groups measured best on the default masked-tile kernel (R-Sparse and
    # sparse-only), and so did the gate+up groups with R-Sparse; sparse-only gate+up groups take
    # the cuBLAS path, as their parts do (the fused kernel measured 0.7x of cuBLAS there, the
    # separate cuBLAS-path calls 0.92-0.96x; the fused cuBLAS path saves one split launch).
    ("m1", 4096, 12288): _CMP_FMA,
    ("m1+lr", 4096, 12288): _CMP_FMA_DYN,
    ("m1", 4096, 22016): _CMP_FMA,
    ("m1+lr", 4096, 22016): _CMP_FMA_DYN,
    ("m2", 4096, 22016): _CUBLAS,
    ("m4", 4096, 22016): _CUBLAS,
    ("m8", 4096, 22016): _CUBLAS,
    ("m1", 4096, 6144): _CMP_FMA,
    ("m1+lr", 4096, 6144): _CMP_FMA_DYN,
    ("m1", 4096, 28672): _CMP_FMA,
    ("m1+lr", 4096, 28672): dict(_CMP_FMA, BLOCK_KR=16),
    ("m2", 4096, 28672): _CUBLAS,
    ("m4", 4096, 28672): _CUBLAS,
    ("m8", 4096, 28672): _CUBLAS,
}


def _default_16bit(cls: str, K: int, N: int) -> dict:
    """16-bit shapes not in the table: the variant that won at the nearest measured shapes."""
    if cls == "m1":
        # large layers: compacted kept rows, FMA product; small ones: masked tiles, tl.dot
        return _CMP_FMA if K * N >= 8 * 2**20 else _PLAIN_DOT
    return {}  # batch: masked row tiles, tl.dot (the "mm" base config)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def _pick_config(M: int, K: int, N: int, elt: int, override: Optional[dict],
                 has_lr: bool = False) -> dict:
    """Base config of the batch class, then the per-shape table (16-bit), or, if given, the
    override (`_config=`, used by tests and the benchmark's sweep) on top of the base."""
    cls = _batch_class(M)
    cfg = dict(_DEFAULT_CONFIGS["m1" if M == 1 else "mm"])
    cfg.update(_LR_DEFAULTS)
    cfg.update(_LR_FUSED_DEFAULTS)
    cfg.update(_MODE_DEFAULTS)
    if elt == 4 and M > 1:  # fp32 FMA dot: smaller K tiles, else register spills
        cfg.update(BLOCK_K=32)
    if elt == 2 and not override:  # an explicit override applies to the base config
        entry = _CONFIG_TABLE.get((cls + "+lr", K, N)) if has_lr else None
        if entry is None:
            entry = _CONFIG_TABLE.get((cls, K, N))
        cfg.update(entry if entry is not None else _default_16bit(cls, K, N))
    if override:
        unknown = set(override) - set(cfg)
        if unknown:
            raise ValueError(f"unknown kernel config keys {sorted(unknown)}")
        cfg.update(override)
    if cfg["PATH"] not in ("triton", "cublas"):
        raise ValueError(f"PATH must be 'triton' or 'cublas', got {cfg['PATH']!r}")
    if cfg["EPI"] not in ("tile", "launch"):
        raise ValueError(f"EPI must be 'tile' or 'launch', got {cfg['EPI']!r}")
    return cfg


# --------------------------------------------------------------------------------------------
# scratch buffers (kept zero between calls by the epilogue)
# --------------------------------------------------------------------------------------------

_SCRATCH: dict = {}
_SCRATCH_LOCK = threading.Lock()


def _scratch(device: torch.device, n_ws: int, n_z: int, n_cnt: int, det: bool = False):
    """fp32 workspace ws and z, int32 tile counters cnt, all zero; each call leaves them zero
    (det: ws and z hold per-program slots that every call rewrites, left as they are)."""
    key = (device.type, device.index, n_ws, n_z, n_cnt, det)
    with _SCRATCH_LOCK:
        ent = _SCRATCH.get(key)
        if ent is None:
            ent = dict(ws=torch.zeros(max(n_ws, 1), dtype=torch.float32, device=device),
                       z=torch.zeros(max(n_z, 1), dtype=torch.float32, device=device),
                       cnt=torch.zeros(max(n_cnt, 1), dtype=torch.int32, device=device), det=det)
            _SCRATCH[key] = ent
    return ent["ws"], ent["z"], ent["cnt"]


def _slot_scratch(device: torch.device, n: int):
    """int32 per-program slots of compacted kept channels (each program rewrites its own slot
    before reading it, so the contents never need clearing)."""
    key = (device.type, device.index, "slots", n)
    with _SCRATCH_LOCK:
        ent = _SCRATCH.get(key)
        if ent is None:
            ent = dict(slots=torch.zeros(max(n, 1), dtype=torch.int32, device=device))
            _SCRATCH[key] = ent
    return ent["slots"]


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

class _Part(NamedTuple):
    """One validated projection of a call."""
    w_t: torch.Tensor
    N: int
    thr_t: Optional[torch.Tensor]  # fp32 tensor on the device, or None (then thr_val)
    thr_val: float
    scale: Optional[torch.Tensor]  # fp32 contiguous (K,)
    lr_down: Optional[torch.Tensor]
    lr_up: Optional[torch.Tensor]
    R: int  # 0: no low-rank term
    bias: Optional[torch.Tensor]


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


def _run_cublas(x2: torch.Tensor, parts: Sequence[_Part], ys: Sequence[torch.Tensor]):
    """Dense path for batches where the sparse kernel stops paying: one Triton launch writes
    x*m_p (and x*(1-m_p) for low-rank parts), then cuBLAS: y_p = x*m_p @ w_t_p + bias_p
    (+ (x*(1-m_p) @ lr_down_p) @ lr_up_p)."""
    M, K = x2.shape
    xk = [torch.empty(M, K, dtype=x2.dtype, device=x2.device) for _ in parts]
    xd = [torch.empty(M, K, dtype=x2.dtype, device=x2.device) if p.R else xk[i]
          for i, p in enumerate(parts)]
    args, flags = [], []
    for i in range(MAX_PARTS):
        if i < len(parts):
            p = parts[i]
            args += [p.thr_t if p.thr_t is not None else xk[i], p.thr_val,
                     p.scale if p.scale is not None else xk[i], xk[i], xd[i]]
            flags += [p.thr_t is not None, p.scale is not None, p.R > 0]
        else:
            args += [xk[0], 0.0, xk[0], xk[0], xk[0]]
            flags += [False, False, False]
    BLOCK = 1024
    _split_input_kernel[(triton.cdiv(K, BLOCK), M)](
        x2, x2.stride(0), K, *args, *flags, NUM_PARTS=len(parts), BLOCK=BLOCK, num_warps=4)
    for i, p in enumerate(parts):
        if p.bias is not None:
            torch.addmm(p.bias.to(x2.dtype), xk[i], p.w_t, out=ys[i])
        else:
            torch.mm(xk[i], p.w_t, out=ys[i])
        if p.R:
            ys[i].addmm_(xd[i] @ p.lr_down, p.lr_up)


def _run_triton(x2: torch.Tensor, parts: Sequence[_Part], ys: Sequence[torch.Tensor], cfg: dict):
    M, K = x2.shape
    dev = x2.device
    interp = _interpret_mode()
    M_PAD = 16 if (M > 1 or cfg["M1_DOT"]) else 1
    dot_upcast = bool(M_PAD > 1 and x2.dtype == torch.bfloat16 and interp)
    use_pdl = bool(cfg["PDL"]) and not interp and dev.type == "cuda"
    BN, BK, KIT = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["K_ITERS"]
    compact = bool(cfg["COMPACT"])
    CH, G = cfg["CH"], cfg["G"]
    if compact and (CH % G or (G < 16 and M_PAD > 1)):
        raise ValueError("COMPACT needs CH % G == 0 (and G >= 16 for the tl.dot path)")
    n_kc = triton.cdiv(K, CH) if compact else triton.cdiv(K, BK * KIT)
    R_max = max(p.R for p in parts)
    any_lr = R_max > 0
    BLOCK_R = min(cfg["BLOCK_R"], max(16, _next_pow2(R_max)))
    BLOCK_KP = cfg["BLOCK_KP"]
    BLOCK_KR = min(cfg["BLOCK_KR"] or BK, max(16, _next_pow2(R_max)))
    det = bool(cfg["DET"])
    lr_fused = bool(cfg["LR_FUSED"]) and any_lr and not det
    LR_KS = max(BLOCK_KP, cfg["LR_KS"] // BLOCK_KP * BLOCK_KP)
    LR_NG, BLOCK_NL = cfg["LR_NG"], cfg["BLOCK_NL"]
    epi_tile = cfg["EPI"] == "tile" and not lr_fused and not det
    n_kp = triton.cdiv(K, BLOCK_KP)
    nt = 32 * cfg["num_warps"]

    # per-part offsets into the shared scratch and program-id ranges of each kernel; EPI tile:
    # per part, counters of its column tiles (co: first; ex: programs per tile) and of its
    # low-rank programs (zc, after every tile counter; nl: how many). DET: a part's ws holds
    # ex slots (one per input chunk, then one per rank chunk) and its z n_kp slots.
    ws_off, z_off, z_end, lr_end, sp_end, cnt_off, expect, n_lr = [], [], [], [], [], [], [], []
    n_ws = n_z = zc = lc = sc = n_cnt = 0
    for p in parts:
        ws_off.append(n_ws)
        z_off.append(n_z)
        cnt_off.append(n_cnt)
        n_tiles = triton.cdiv(p.N, BN)
        n_cnt += n_tiles
        n_rc = triton.cdiv(p.R, BLOCK_KR) if p.R else 0
        n_ws += M * p.N * ((n_kc + n_rc) if det else 1)
        n_z += M * p.R * (n_kp if det else 1)
        expect.append(n_kc + n_rc)
        n_lr.append(n_tiles * n_rc)
        if p.R and lr_fused:
            lc += triton.cdiv(p.R, BLOCK_R) * triton.cdiv(K, LR_KS) * LR_NG
        elif p.R:
            zc += n_kp * triton.cdiv(p.R, BLOCK_R)
            lc += n_tiles * n_rc
        sc += n_tiles * n_kc
        z_end.append(zc)
        lr_end.append(lc)
        sp_end.append(sc)
    z_cnt = [n_cnt + i for i in range(len(parts))]
    n_cnt += len(parts)
    ws, zbuf, cnt = _scratch(dev, n_ws, n_z, n_cnt, det)
    slots = _slot_scratch(dev, sc * CH) if compact else ws
    dummy = ws

    def part_args(i, names):
        """Per-part argument values (dummies for parts beyond the call's)."""
        p = parts[i] if i < len(parts) else None
        vals = []
        for nm in names:
            if p is None:
                vals.append(0 if nm in ("N", "R", "wo", "zo", "sdn", "sup", "sw", "sy", "co", "ex",
                                        "zc", "nl", "ns")
                            else 0.0 if nm == "tv" else dummy)
                continue
            vals.append({
                "co": cnt_off[i], "ex": expect[i], "zc": z_cnt[i], "nl": n_lr[i], "ns": expect[i],
                "w": p.w_t, "sw": p.w_t.stride(0), "thr": p.thr_t if p.thr_t is not None else dummy,
                "tv": p.thr_val, "sc": p.scale if p.scale is not None else dummy,
                "dn": p.lr_down if p.R else dummy, "sdn": p.lr_down.stride(0) if p.R else 0,
                "up": p.lr_up if p.R else dummy, "sup": p.lr_up.stride(0) if p.R else 0,
                "N": p.N, "R": p.R, "wo": ws_off[i], "zo": z_off[i],
                "y": ys[i], "sy": ys[i].stride(0), "b": p.bias if p.bias is not None else dummy,
            }[nm])
        return vals

    def flags(i):
        p = parts[i] if i < len(parts) else None
        if p is None:
            return [False, False, False]
        return [p.thr_t is not None, p.scale is not None, p.R > 0]

    all_flags = flags(0) + flags(1) + flags(2)
    n_parts = len(parts)
    last = lambda ends: ends[-1]  # noqa: E731
    pad_ends = lambda ends: ends + [ends[-1]] * (MAX_PARTS - len(ends))  # noqa: E731
    ze, le, se = pad_ends(z_end), pad_ends(lr_end), pad_ends(sp_end)
    pdl_kw = dict(launch_pdl=True) if use_pdl else {}

    if any_lr and not lr_fused:
        zargs = []
        for i in range(MAX_PARTS):
            zargs += part_args(i, ("thr", "tv", "sc", "dn", "sdn", "R", "zo"))
            if i < MAX_PARTS - 1:
                zargs.append(ze[i])
        _z_kernel[(last(z_end),)](
            x2, x2.stride(0), M, K, zbuf, *zargs, *all_flags,
            NUM_PARTS=n_parts, M_PAD=M_PAD, BLOCK_KP=BLOCK_KP, BLOCK_R=BLOCK_R,
            DOT_UPCAST=dot_upcast, USE_PDL=use_pdl, DET=det, num_warps=cfg["Z_WARPS"],
            num_stages=1, **pdl_kw)
    has_bias = [i < n_parts and parts[i].bias is not None for i in range(MAX_PARTS)]
    rtne_fix = bool(x2.dtype == torch.bfloat16 and interp)
    margs = []
    for i in range(MAX_PARTS):
        margs += part_args(i, ("w", "sw", "thr", "tv", "sc", "dn", "sdn", "up", "sup", "N", "R",
                               "wo", "zo", "y", "sy", "b", "co", "ex", "zc", "nl"))
        margs.append(le[i])
        if i < MAX_PARTS - 1:
            margs.append(se[i])
    _main_kernel[(last(lr_end) + last(sp_end),)](
        x2, x2.stride(0), M, K, ws, zbuf, slots, cnt, n_kc, *margs, *all_flags, *has_bias,
        NUM_PARTS=n_parts, M_PAD=M_PAD, BLOCK_N=BN, BLOCK_K=BK, K_ITERS=KIT, BLOCK_KR=BLOCK_KR,
        CH=CH, G=G, COMPACT=compact, DYN=bool(cfg["DYN"]),
        REGIDX=bool(cfg["REGIDX"]), BLOCK_R=BLOCK_R, BLOCK_KP=BLOCK_KP, LR_KS=LR_KS,
        LR_NG=LR_NG, BLOCK_NL=BLOCK_NL, LR_FUSED=lr_fused, DOT_UPCAST=dot_upcast,
        USE_PDL=use_pdl, AFTER_Z=any_lr and not lr_fused, EPI_TILE=epi_tile, NT=nt,
        FENCE=epi_tile and not interp, RTNE_FIX=rtne_fix, DET=det, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl_kw)
    if epi_tile:
        return
    BLOCK_E = cfg["BLOCK_E"]
    eargs, e_end, ec = [], [], 0
    for p in parts:
        ec += triton.cdiv(p.N, BLOCK_E)
        e_end.append(ec)
    e_end = pad_ends(e_end)
    for i in range(MAX_PARTS):
        eargs += part_args(i, ("y", "sy", "b", "N", "wo", "ns"))
        if i < MAX_PARTS - 1:
            eargs.append(e_end[i])
    _epilogue_kernel[(e_end[-1], M)](
        ws, zbuf, 0 if lr_fused or det else n_z, *eargs, *has_bias, NUM_PARTS=n_parts,
        BLOCK_E=BLOCK_E, RTNE_FIX=rtne_fix, USE_PDL=use_pdl, DET=det, num_warps=4, **pdl_kw)


def _decode(x: torch.Tensor, raw_parts: Sequence[tuple], outs: Sequence[Optional[torch.Tensor]],
            _config: Optional[dict]) -> list:
    """Shared body of the public functions: validate, allocate, dispatch; returns (M, N_p) views."""
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
    if M == 0:
        return ys
    if K == 0:
        for p, y in zip(parts, ys):
            y.zero_()
            if p.bias is not None:
                y += p.bias.to(x.dtype)
        return ys
    live = [i for i, p in enumerate(parts) if p.N > 0]
    if not live:
        return ys
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
    else:
        _run_triton(x2, run_parts, run_ys, cfg)
    return ys


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
