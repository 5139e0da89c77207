"""Triton decode kernels for one R-Sparse linear layer.

Math (per input row ``b``; ``W ~= A B``, ``w_t = W^T`` (in, out), ``lr_down = B^T`` (in, r),
``lr_up = A^T`` (r, out)):

    m[b, j] = |x[b, j]| * score_scale[j] > threshold          (strict; fp32 compare)
    z[b]    = sum_{j: not m[b, j]} x[b, j] * lr_down[j, :]     (fp32)
    y[b]    = sum_{j: m[b, j]} x[b, j] * w_t[j, :] + z[b] @ lr_up (+ bias)

Design (no host synchronisation, no memset, CUDA-graph safe; all scratch stays zero between
calls):

1. ``_prep_kernel`` (a) with a low-rank term: split-k over ``lr_down`` rows; each program
   computes the partial ``z`` of a chunk of the in-dimension for the DROPPED channels (only rows
   that some batch row drops are fetched) and atomically adds it (fp32) into a zeroed ``z``;
   (b) in COMPACT mode: per chunk of CH input channels, the list of channels that some batch row
   keeps (cumsum + scatter) and its length.
2. ``_main_kernel``: split-k over the rows of ``w_t`` (= input channels). COMPACT mode walks
   only the listed kept rows, G at a time, so dropped rows cost neither memory traffic nor
   arithmetic; the plain mode loads row tiles predicated on "some batch row keeps it" (no
   traffic for dropped rows, but the arithmetic still runs over the whole tile). The last
   programs multiply ``z`` with the ``lr_up`` rows. Partial sums go to an fp32 workspace with
   relaxed atomic adds. The tile product runs on the tensor cores (``tl.dot``, batch padded to
   16) for M > 1 and, with M1_DOT, also for M = 1; otherwise as fp32 FMAs.
3. ``_epilogue_kernel``: y = cast(workspace + bias) in x's dtype, then zeroes workspace and ``z``.

Launches per call: 3 (prep, main, epilogue), or 2 when there is neither a low-rank term nor
COMPACT mode. The threshold test is recomputed in each kernel (cheap) instead of materialising
a mask. Configs (tile sizes, COMPACT, M1_DOT) are chosen per shape from a table measured on an
H100 (``_CONFIG_TABLE``), with a size heuristic for other shapes. An earlier one-launch version
(ticketed roles + per-tile semaphores) was slower and racy: see docs/kernel-notes.md.

Batch (M > 1, at most 8 rows): every row has its own mask (exact per-row semantics as above);
a weight row of ``w_t`` is read if ANY batch row keeps the channel (union of masks) and rows that
do not keep it contribute exactly 0 (likewise ``lr_down`` rows are read for the union of drops).
The batched path runs the tile products as a ``tl.dot`` with the batch padded to 16 rows.

Constraints: ``w_t``, ``lr_down``, ``lr_up`` must be row-contiguous (``stride(-1) == 1``) and have
the same dtype as ``x`` (fp16, bf16 or fp32); ``score_scale`` fp32 (other dtypes are converted
per call); the threshold is compared in fp32. Scratch buffers are cached per device and shape and
reused: calls must be ordered on one stream (as in a decode loop or CUDA graph); do the first
call for a shape before graph capture so that the scratch is not allocated inside the capture.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Optional, Union

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
    "rsparse_decode_linear",
    "rsparse_decode_linear_reference",
    "triton_available",
]

MAX_BATCH_ROWS = 8
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


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------

if _HAS_TRITON:

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

    @triton.jit
    def _prep_kernel(x_ptr, stride_xm, thr_ptr, thr_val, scale_ptr, down_ptr, stride_dk, z_ptr,
                     idx_ptr, cnt_ptr, M, K, R, n_rt, n_z, n_ch,
                     M_PAD: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_R: tl.constexpr,
                     CH: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LR: tl.constexpr,
                     COMPACT: tl.constexpr, THR_IS_PTR: tl.constexpr,
                     DOT_UPCAST: tl.constexpr):
        """Program pid: (a) z partial of K chunk pid // n_rt, r-tile pid % n_rt (if pid < n_z):
        z[b, r-tile] += sum over the chunk's DROPPED channels of x[b, j] * lr_down[j, :];
        (b) compaction of rows chunk pid (if pid < n_ch): idx[pid*CH + i] = i-th row of the
        chunk that some batch row keeps, cnt[pid] = their number."""
        pid = tl.program_id(0)
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        if HAS_LR:
            if pid < n_z:
                rt = pid % n_rt
                kp = pid // n_rt
                offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
                r_ok = offs_r < R
                offs_k = kp * BLOCK_KP + tl.arange(0, BLOCK_KP)
                d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :]
                if M_PAD == 1:
                    xv, keep, ok = _load_x1(x_ptr, scale_ptr, offs_k, K, thr, HAS_SCALE)
                    drop = ok & (~keep)
                    acc = _mac1(tl.zeros([BLOCK_R], dtype=tl.float32), tl.where(drop, xv, 0.0),
                                d_ptrs, drop, r_ok)
                    tl.atomic_add(z_ptr + offs_r, acc, mask=r_ok, sem="relaxed")
                else:
                    offs_m = tl.arange(0, M_PAD)
                    xv, keep, ok = _load_xm(x_ptr, stride_xm, scale_ptr, offs_k, K, M, thr,
                                            M_PAD, HAS_SCALE)
                    drop = ok & (~keep)
                    row_any = tl.max(drop.to(tl.int32), axis=0) > 0
                    acc = _macm(tl.zeros([M_PAD, BLOCK_R], dtype=tl.float32),
                                tl.where(drop, xv, 0.0), d_ptrs, row_any, r_ok, False,
                                DOT_UPCAST)
                    tl.atomic_add(z_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
                                  mask=(offs_m < M)[:, None] & r_ok[None, :], sem="relaxed")
        if COMPACT:
            if pid < n_ch:
                offs_c = pid * CH + tl.arange(0, CH)
                if M_PAD == 1:
                    xv1, keep1, ok1 = _load_x1(x_ptr, scale_ptr, offs_c, K, thr, HAS_SCALE)
                    kany = keep1.to(tl.int32)
                else:
                    xvm, keepm, okm = _load_xm(x_ptr, stride_xm, scale_ptr, offs_c, K, M, thr,
                                               M_PAD, HAS_SCALE)
                    kany = tl.max(keepm.to(tl.int32), axis=0)
                pos = tl.cumsum(kany, 0) - 1
                tl.store(idx_ptr + pid * CH + pos, offs_c, mask=kany > 0)
                tl.store(cnt_ptr + pid, tl.sum(kany, 0))

    @triton.jit
    def _sparse_tile(pid, x_ptr, stride_xm, w_ptr, stride_wk, thr, scale_ptr, ws_ptr,
                     M, K, N, n_tiles,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_UPCAST: tl.constexpr):
        n = pid % n_tiles
        kc = pid // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if M_PAD == 1:
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for it in tl.static_range(K_ITERS):
                offs_k = (kc * K_ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
                xv, keep, ok = _load_x1(x_ptr, scale_ptr, offs_k, K, thr, HAS_SCALE)
                acc1 = _mac1(acc1, tl.where(keep, xv, 0.0),
                             w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :], keep, n_ok)
            tl.atomic_add(ws_ptr + offs_n, acc1, mask=n_ok, sem="relaxed")
        else:
            offs_m = tl.arange(0, M_PAD)
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            for it in tl.static_range(K_ITERS):
                offs_k = (kc * K_ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
                xv, keep, ok = _load_xm(x_ptr, stride_xm, scale_ptr, offs_k, K, M, thr,
                                        M_PAD, HAS_SCALE)
                row_any = tl.max(keep.to(tl.int32), axis=0) > 0
                acc = _macm(acc, tl.where(keep, xv, 0.0),
                            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                            row_any, n_ok, False, DOT_UPCAST)
            tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                          mask=(offs_m < M)[:, None] & n_ok[None, :], sem="relaxed")

    @triton.jit
    def _sparse_tile_compact(pid, x_ptr, stride_xm, w_ptr, stride_wk, thr, scale_ptr, ws_ptr,
                             idx_ptr, cnt_ptr, M, N, n_tiles,
                             M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr,
                             G: tl.constexpr, HAS_SCALE: tl.constexpr,
                             DOT_UPCAST: tl.constexpr):
        """Like _sparse_tile but walks only the kept rows of the chunk (compacted list), G rows
        at a time: no loads AND no arithmetic for dropped rows."""
        n = pid % n_tiles
        kc = pid // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        cnt = tl.load(cnt_ptr + kc)
        if M_PAD == 1:
            # (G, BN) accumulator: one FMA per loaded element, one reduction at the end
            acc2 = tl.zeros([G, BLOCK_N], dtype=tl.float32)
            for g in tl.static_range(CH // G):
                if g * G < cnt:
                    r = g * G + tl.arange(0, G)
                    r_ok = r < cnt
                    rows = tl.load(idx_ptr + kc * CH + r, mask=r_ok, other=0)
                    xv = tl.load(x_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
                    w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                                mask=r_ok[:, None] & n_ok[None, :], other=0.0,
                                eviction_policy="evict_first")
                    acc2 += w.to(tl.float32) * xv[:, None]
            tl.atomic_add(ws_ptr + offs_n, tl.sum(acc2, axis=0), mask=n_ok, sem="relaxed")
        else:
            offs_m = tl.arange(0, M_PAD)
            m_ok = offs_m < M
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            for g in tl.static_range(CH // G):
                if g * G < cnt:
                    r = g * G + tl.arange(0, G)
                    r_ok = r < cnt
                    rows = tl.load(idx_ptr + kc * CH + r, mask=r_ok, other=0)
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
            tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                          mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")

    @triton.jit
    def _lowrank_tile(c, up_ptr, stride_ur, z_ptr, ws_ptr, M, N, R, n_tiles,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                      DOT_UPCAST: tl.constexpr):
        n = c % n_tiles
        rc = c // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_c = rc * BLOCK_KR + tl.arange(0, BLOCK_KR)
        c_ok = offs_c < R
        up_ptrs = up_ptr + offs_c[:, None] * stride_ur + offs_n[None, :]
        if M_PAD == 1:
            zin = tl.load(z_ptr + offs_c, mask=c_ok, other=0.0, cache_modifier=".cg")
            acc1 = _mac1(tl.zeros([BLOCK_N], dtype=tl.float32), zin, up_ptrs, c_ok, n_ok)
            tl.atomic_add(ws_ptr + offs_n, acc1, mask=n_ok, sem="relaxed")
        else:
            offs_m = tl.arange(0, M_PAD)
            m_ok = offs_m < M
            zin = tl.load(z_ptr + offs_m[:, None] * R + offs_c[None, :],
                          mask=m_ok[:, None] & c_ok[None, :], other=0.0, cache_modifier=".cg")
            acc = _macm(tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), zin, up_ptrs, c_ok, n_ok,
                        True, DOT_UPCAST)
            tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                          mask=m_ok[:, None] & n_ok[None, :], sem="relaxed")

    @triton.jit
    def _main_kernel(x_ptr, stride_xm, w_ptr, stride_wk, thr_ptr, thr_val, scale_ptr,
                     up_ptr, stride_ur, z_ptr, ws_ptr, idx_ptr, cnt_ptr,
                     M, K, N, R, n_tiles, n_kc,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, BLOCK_KR: tl.constexpr, CH: tl.constexpr,
                     G: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_LR: tl.constexpr,
                     COMPACT: tl.constexpr, THR_IS_PTR: tl.constexpr,
                     DOT_UPCAST: tl.constexpr):
        """Sparse tiles (pid < n_tiles * n_kc), then low-rank tiles; fp32 partials -> ws."""
        pid = tl.program_id(0)
        P2 = n_tiles * n_kc
        if pid < P2:
            thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
            if COMPACT:
                _sparse_tile_compact(pid, x_ptr, stride_xm, w_ptr, stride_wk, thr, scale_ptr,
                                     ws_ptr, idx_ptr, cnt_ptr, M, N, n_tiles, M_PAD, BLOCK_N,
                                     CH, G, HAS_SCALE, DOT_UPCAST)
            else:
                _sparse_tile(pid, x_ptr, stride_xm, w_ptr, stride_wk, thr, scale_ptr, ws_ptr,
                             M, K, N, n_tiles, M_PAD, BLOCK_N, BLOCK_K, K_ITERS, HAS_SCALE,
                             DOT_UPCAST)
        else:
            if HAS_LR:
                _lowrank_tile(pid - P2, up_ptr, stride_ur, z_ptr, ws_ptr, M, N, R, n_tiles,
                              M_PAD, BLOCK_N, BLOCK_KR, DOT_UPCAST)

    @triton.jit
    def _epilogue_kernel(ws_ptr, y_ptr, stride_ym, bias_ptr, z_ptr, N, ZN,
                         BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
                         RTNE_FIX: tl.constexpr):
        """y[b] = cast(ws[b] + bias); ws[b] = 0; z = 0 (scratch clean for the next call).

        grid = (cdiv(N, BLOCK_E), M)."""
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        ok = offs < N
        v = tl.load(ws_ptr + b * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            v += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if RTNE_FIX:
            # the triton interpreter truncates fp32 -> bf16; round to nearest even by hand
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        tl.store(y_ptr + b * stride_ym + offs, v.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(ws_ptr + b * N + offs, tl.zeros([BLOCK_E], dtype=tl.float32), mask=ok)
        if b == 0:
            step = tl.num_programs(0) * BLOCK_E
            for z0 in range(pid * BLOCK_E, ZN, step):
                zo = z0 + tl.arange(0, BLOCK_E)
                tl.store(z_ptr + zo, tl.zeros([BLOCK_E], dtype=tl.float32), mask=zo < ZN)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

# Tile configs; "m1" = one row, "mm" = 2..8 rows (batch padded to 16 for tl.dot).
_DEFAULT_CONFIGS = {
    "m1": dict(BLOCK_N=256, BLOCK_K=64, K_ITERS=1, num_warps=4, num_stages=1),
    "mm": dict(BLOCK_N=128, BLOCK_K=64, K_ITERS=1, num_warps=4, num_stages=1),
}
# Per-shape choices for 16-bit dtypes, measured on an H100 (torch 2.11, triton 3.6; bench
# `--tune`, bf16, s=0.5; docs/kernel-notes.md): ("m1"|"mm", in, out) -> config.
_CMP_DOT = dict(COMPACT=True, M1_DOT=True, BLOCK_N=128, CH=128, G=32, BLOCK_KR=64, num_warps=4)
_CMP_DOT_MM = dict(COMPACT=True, BLOCK_N=128, CH=128, G=32, BLOCK_KR=64, num_warps=4)
_CMP_DOT_MM256 = dict(COMPACT=True, BLOCK_N=256, CH=256, G=32, BLOCK_KR=32, num_warps=8)
_CONFIG_TABLE: dict = {
    ("m1", 4096, 4096): _CMP_DOT,
    ("mm", 4096, 4096): _CMP_DOT_MM,
    ("m1", 4096, 11008): _CMP_DOT,
    ("mm", 4096, 11008): _CMP_DOT_MM,
    ("m1", 11008, 4096): dict(COMPACT=True, BLOCK_N=512, CH=128, G=8, BLOCK_KR=16, num_warps=4),
    ("mm", 11008, 4096): _CMP_DOT_MM,
    ("m1", 4096, 14336): _CMP_DOT,
    ("mm", 4096, 14336): _CMP_DOT_MM256,
    ("m1", 14336, 4096): _CMP_DOT,
    ("mm", 14336, 4096): _CMP_DOT_MM256,
    ("m1", 4096, 1024): dict(M1_DOT=True, BLOCK_N=128, BLOCK_K=64, num_warps=4),
    ("mm", 4096, 1024): dict(BLOCK_N=128, BLOCK_K=64, num_warps=4),
}


def _default_16bit(cls: str, K: int, N: int) -> dict:
    """16-bit shapes not in the table: the variant that won at the nearest measured shapes."""
    if K * N >= 8 * 2**20:  # large layers: compacted kept rows, tensor-core product
        return _CMP_DOT if cls == "m1" else _CMP_DOT_MM
    return dict(M1_DOT=True, BLOCK_N=128, BLOCK_K=64, num_warps=4) if cls == "m1" else {}


# z kernel (lr_down) and low-rank tile (lr_up rows) shapes, epilogue block.
_LR_DEFAULTS = dict(BLOCK_KP=32, BLOCK_R=128, BLOCK_KR=0, Z_WARPS=4, BLOCK_E=512)  # KR 0: = BLOCK_K
# COMPACT: the prep kernel writes, per chunk of CH rows, the list of kept rows; the main kernel
# then walks only those, G at a time. M1_DOT: batch-1 also uses the tensor-core (tl.dot) path.
_MODE_DEFAULTS = dict(COMPACT=False, CH=128, G=16, M1_DOT=False)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def _pick_config(M: int, K: int, N: int, elt: int, override: Optional[dict]) -> dict:
    """Base config of the batch class, then the per-shape table (16-bit), or, if given, the
    override (`_config=`, used by tests and the benchmark's sweep) on top of the base."""
    cls = "m1" if M == 1 else "mm"
    cfg = dict(_DEFAULT_CONFIGS[cls])
    cfg.update(_LR_DEFAULTS)
    cfg.update(_MODE_DEFAULTS)
    if elt == 4 and M > 1:  # fp32 FMA dot: smaller K tiles, else register spills
        cfg.update(BLOCK_K=32)
    if elt == 2 and not override:  # an explicit override applies to the base config
        entry = _CONFIG_TABLE.get((cls, K, N))
        cfg.update(entry if entry is not None else _default_16bit(cls, K, N))
    if override:
        unknown = set(override) - set(cfg)
        if unknown:
            raise ValueError(f"unknown kernel config keys {sorted(unknown)}")
        cfg.update(override)
    return cfg


# --------------------------------------------------------------------------------------------
# scratch buffers (kept zero between calls by the epilogue)
# --------------------------------------------------------------------------------------------

_SCRATCH: dict = {}
_SCRATCH_LOCK = threading.Lock()


def _scratch(device: torch.device, M: int, N: int, R: int):
    """fp32 workspace ws (M*N) and z (M*R), both zero; the epilogue leaves them zero again."""
    key = (device.type, device.index, M, N, R)
    with _SCRATCH_LOCK:
        ent = _SCRATCH.get(key)
        if ent is None:
            ent = dict(ws=torch.zeros(M * N, dtype=torch.float32, device=device),
                       z=torch.zeros(max(M * R, 1), dtype=torch.float32, device=device))
            _SCRATCH[key] = ent
    return ent["ws"], ent["z"]


def _index_scratch(device: torch.device, n_idx: int, n_chunks: int):
    """int32 compacted kept-row lists (fully rewritten by each call's prep kernel)."""
    key = (device.type, device.index, "idx", n_idx, n_chunks)
    with _SCRATCH_LOCK:
        ent = _SCRATCH.get(key)
        if ent is None:
            ent = dict(idx=torch.zeros(n_idx, dtype=torch.int32, device=device),
                       cnt=torch.zeros(n_chunks, dtype=torch.int32, device=device))
            _SCRATCH[key] = ent
    return ent["idx"], ent["cnt"]


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------

def _check_2d(name, t, shape, dtype):
    if t.dim() != 2 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} (same as x), got {t.dtype}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} must be row-contiguous (stride(1) == 1), got strides {t.stride()}")


def rsparse_decode_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: Union[float, torch.Tensor],
                          score_scale: Optional[torch.Tensor] = None,
                          lr_down: Optional[torch.Tensor] = None,
                          lr_up: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None,
                          *, out: Optional[torch.Tensor] = None,
                          _config: Optional[dict] = None) -> torch.Tensor:
    """R-Sparse decode linear layer (Triton; 2-3 launches, no host sync, CUDA-graph safe).

    y[b] = sum_{j: m[b,j]} x[b,j] w_t[j,:] + (sum_{j: not m[b,j]} x[b,j] lr_down[j,:]) @ lr_up + bias
    with m[b,j] = |x[b,j]| * score_scale[j] > threshold (strict, compared in fp32).

    Args:
        x: (..., in) fp16/bf16/fp32; leading dims are flattened to M rows, M <= 8 (ValueError above).
        w_t: (in, out) transposed weight, same dtype as x, rows contiguous (stride(1) == 1).
        threshold: Python float (baked into a captured graph) or a 0-d/1-element tensor on x's
            device (read by the kernel at run time: no recompile, graph-safe). +inf keeps nothing.
        score_scale: optional (in,) per-channel score multiplier (fp32 preferred); None means 1.
        lr_down: optional (in, r) = B^T, lr_up: optional (r, out) = A^T, same dtype as x; None or
            r == 0 gives the sparse-only GEMV.
        bias: optional (out,).
        out: optional preallocated output, contiguous, x's dtype, shape (..., out) or (M, out);
            every element is overwritten. Returned (reshaped to x's leading dims).

    Each row has its own mask (exact per-row semantics). For M > 1 a row of ``w_t`` is fetched if
    ANY row keeps the channel (union); rows that don't keep it contribute 0. Accumulation is in
    fp32; the output has x's dtype and shape (..., out).
    """
    if not _HAS_TRITON:
        raise RuntimeError("rsparse_decode_linear needs triton (pip install triton)")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be one of fp16/bf16/fp32, got {x.dtype}")
    if w_t.dim() != 2:
        raise ValueError(f"w_t must be 2-D (in, out), got shape {tuple(w_t.shape)}")
    K, N = w_t.shape
    if x.shape[-1] != K:
        raise ValueError(f"x last dim {x.shape[-1]} does not match w_t in-dim {K}")
    lead = x.shape[:-1]
    M = math.prod(lead) if len(lead) else 1
    if M > MAX_BATCH_ROWS:
        raise ValueError(f"rsparse_decode_linear supports at most {MAX_BATCH_ROWS} rows "
                         f"(flattened leading dims), got {M}")
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
        if score_scale.dtype != torch.float32 or not score_scale.is_contiguous():
            score_scale = score_scale.float().contiguous()
    if bias is not None:
        if bias.numel() != N:
            raise ValueError(f"bias must have {N} elements, got {bias.numel()}")
        bias = bias.reshape(N)
        if not bias.is_contiguous():
            bias = bias.contiguous()
    if out is not None and (out.numel() != M * N or out.dtype != x.dtype or out.device != dev
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of {M}x{N} elements on {dev}")
    if M == 0 or N == 0:
        return x.new_empty(*lead, N) if out is None else out.view(*lead, N)
    y = torch.empty(M, N, dtype=x.dtype, device=dev) if out is None else out.view(M, N)
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(x.dtype)
        return y.view(*lead, N)

    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()

    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError("threshold tensor must have one element")
        thr_t = threshold
        if thr_t.device != dev or thr_t.dtype != torch.float32:
            thr_t = thr_t.to(device=dev, dtype=torch.float32)
        thr_is_ptr, thr_val = True, 0.0
    else:
        thr_t, thr_is_ptr, thr_val = None, False, float(threshold)

    cfg = _pick_config(M, K, N, x.element_size(), _config)
    M_PAD = 16 if (M > 1 or cfg["M1_DOT"]) else 1
    interp = _interpret_mode()
    dot_upcast = bool(M_PAD > 1 and x.dtype == torch.bfloat16 and interp)
    BN, BK, KIT = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["K_ITERS"]
    compact = bool(cfg["COMPACT"])
    CH, G = cfg["CH"], cfg["G"]
    if compact and (CH % G or G < 16 and M_PAD > 1):
        raise ValueError("COMPACT needs CH % G == 0 (and G >= 16 for the batched path)")
    n_tiles = triton.cdiv(N, BN)
    n_kc = triton.cdiv(K, CH) if compact else triton.cdiv(K, BK * KIT)
    ws, zbuf = _scratch(dev, M, N, R)
    dummy = ws
    thr_arg = thr_t if thr_is_ptr else dummy
    scale_arg = score_scale if score_scale is not None else dummy
    has_scale = score_scale is not None
    idx, cnt = _index_scratch(dev, n_kc * CH, n_kc) if compact else (dummy, dummy)

    n_lr = 0
    BLOCK_KR = 16
    n_z = n_rt = 0
    BLOCK_R, BLOCK_KP = 16, 16
    if has_lr:
        BLOCK_R = min(cfg["BLOCK_R"], max(16, _next_pow2(R)))
        BLOCK_KP = cfg["BLOCK_KP"]
        n_rt = triton.cdiv(R, BLOCK_R)
        n_z = triton.cdiv(K, BLOCK_KP) * n_rt
        BLOCK_KR = min(cfg["BLOCK_KR"] or BK, max(16, _next_pow2(R)))
        n_lr = n_tiles * triton.cdiv(R, BLOCK_KR)
    n_prep = max(n_z, n_kc if compact else 0)
    if n_prep:
        _prep_kernel[(n_prep,)](
            x2, x2.stride(0), thr_arg, thr_val, scale_arg,
            lr_down if has_lr else w_t, lr_down.stride(0) if has_lr else 0, zbuf, idx, cnt,
            M, K, R, n_rt, n_z, n_kc if compact else 0,
            M_PAD=M_PAD, BLOCK_KP=BLOCK_KP, BLOCK_R=BLOCK_R, CH=CH, HAS_SCALE=has_scale,
            HAS_LR=has_lr, COMPACT=compact, THR_IS_PTR=thr_is_ptr, DOT_UPCAST=dot_upcast,
            num_warps=cfg["Z_WARPS"], num_stages=1,
        )
    _main_kernel[(n_tiles * n_kc + n_lr,)](
        x2, x2.stride(0), w_t, w_t.stride(0), thr_arg, thr_val, scale_arg,
        lr_up if has_lr else w_t, lr_up.stride(0) if has_lr else 0, zbuf, ws, idx, cnt,
        M, K, N, R, n_tiles, n_kc,
        M_PAD=M_PAD, BLOCK_N=BN, BLOCK_K=BK, K_ITERS=KIT, BLOCK_KR=BLOCK_KR, CH=CH, G=G,
        HAS_SCALE=has_scale, HAS_LR=has_lr, COMPACT=compact, THR_IS_PTR=thr_is_ptr,
        DOT_UPCAST=dot_upcast, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    BLOCK_E = cfg["BLOCK_E"]
    _epilogue_kernel[(triton.cdiv(N, BLOCK_E), M)](
        ws, y, y.stride(0), bias if bias is not None else dummy, zbuf, N, M * R if has_lr else 0,
        BLOCK_E=BLOCK_E, HAS_BIAS=bias is not None,
        RTNE_FIX=bool(x.dtype == torch.bfloat16 and interp), num_warps=4,
    )
    return y.view(*lead, N)
