"""Device code of the R-Sparse decode kernels: every ``@triton.jit`` function (the z, main,
epilogue and input-split kernels and their helpers). The design notes, the host side that
launches them and the public functions are in triton_rsparse.py.

triton is optional: without it this module still imports (``_HAS_TRITON`` False, no kernels).
"""

from __future__ import annotations

import os

try:  # triton is optional: the module must import without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    def _put(ptrs, val, mask, DET: tl.constexpr):
        """Add a partial sum into the fp32 workspace: a relaxed atomic add, or (DET) a plain store
        into this program's own slot (the caller points ptrs there), summed in a fixed order
        later."""
        if DET:
            tl.store(ptrs, val, mask=mask)
        else:
            tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")

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
    def _lowrank_part(q, up_ptr, stride_ur, z_ptr, ws_ptr, M, N, R, n_kp,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                      LR_G: tl.constexpr, DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
        """ws[b, n-tile] += z[b, r-chunk] @ lr_up[r-chunk, n-tile].
        DET: z is the fixed-order sum of its n_kp slots, and ws_ptr points at this program's
        slot. LR_G (batch 1): the chunk's factor rows LR_G at a time into a (LR_G, BN)
        accumulator, so the tile never sits in registers whole (a (64, 512) tile spills)."""
        n_tiles = tl.cdiv(N, BLOCK_N)
        n = q % n_tiles
        rc = q // n_tiles
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_c = rc * BLOCK_KR + tl.arange(0, BLOCK_KR)
        c_ok = offs_c < R
        up_ptrs = up_ptr + offs_c[:, None] * stride_ur + offs_n[None, :]
        if M_PAD == 1 and LR_G > 0:
            acc2 = tl.zeros([LR_G, BLOCK_N], dtype=tl.float32)
            for c in range(0, BLOCK_KR // LR_G):  # a run-time loop: loads not all hoisted
                offs_g = rc * BLOCK_KR + c * LR_G + tl.arange(0, LR_G)
                g_ok = offs_g < R
                if DET:
                    zg = _slot_sum(z_ptr, n_kp, M * R, offs_g, g_ok, 16)
                else:
                    zg = tl.load(z_ptr + offs_g, mask=g_ok, other=0.0, cache_modifier=".cg")
                w = tl.load(up_ptr + offs_g[:, None] * stride_ur + offs_n[None, :],
                            mask=g_ok[:, None] & n_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
                acc2 += w.to(tl.float32) * zg[:, None]
            _put(ws_ptr + offs_n, tl.sum(acc2, axis=0), n_ok, DET)
        elif M_PAD == 1:
            if DET:
                zin = _slot_sum(z_ptr, n_kp, M * R, offs_c, c_ok, 16)
            else:
                zin = tl.load(z_ptr + offs_c, mask=c_ok, other=0.0, cache_modifier=".cg")
            acc1 = _mac1(tl.zeros([BLOCK_N], dtype=tl.float32), zin, up_ptrs, c_ok, n_ok)
            _put(ws_ptr + offs_n, acc1, n_ok, DET)
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
            acc = _macm(tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32), zin, up_ptrs, c_ok, n_ok,
                        True, DOT_UPCAST)
            _put(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                 m_ok[:, None] & n_ok[None, :], DET)

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
                          stride_dk, up_ptr, stride_ur, z_ptr, ws_ptr, N, R,
                          M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_KP: tl.constexpr, LR_KS: tl.constexpr,
                          LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr, LR_FUSED: tl.constexpr,
                          LR_G: tl.constexpr, THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                          DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
        """The part's low-rank program q."""
        if LR_FUSED:
            _lowrank_fused_part(q, x_ptr, stride_xm, M, K, thr_ptr, thr_val, scale_ptr, down_ptr,
                                stride_dk, up_ptr, stride_ur, ws_ptr, N, R, M_PAD, BLOCK_R,
                                BLOCK_KP, LR_KS, LR_NG, BLOCK_NL, THR_IS_PTR, HAS_SCALE,
                                DOT_UPCAST)
        else:
            _lowrank_part(q, up_ptr, stride_ur, z_ptr, ws_ptr, M, N, R, tl.cdiv(K, BLOCK_KP),
                          M_PAD, BLOCK_N, BLOCK_KR, LR_G, DOT_UPCAST, DET)

    @triton.jit
    def _sparse_plain_part(q, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr, scale_ptr, ws_ptr,
                           N, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           K_ITERS: tl.constexpr, HAS_SCALE: tl.constexpr,
                           DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
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
            _put(ws_ptr + offs_n, acc1, n_ok, DET)
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
            _put(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                 (offs_m < M)[:, None] & n_ok[None, :], DET)

    @triton.jit
    def _slot_group(g0, cnt, slot_ptr, x_ptr, w_ptr, stride_wk, offs_n, n_ok, G: tl.constexpr):
        """Weights (G, BN) and x values of kept ranks g0 .. g0+G-1 (from the slot); ranks past
        cnt are masked off, so a group past the end loads nothing."""
        r = g0 + tl.arange(0, G)
        r_ok = r < cnt
        rows = tl.load(slot_ptr + r, mask=r_ok, other=0)
        xv = tl.load(x_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :],
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0, eviction_policy="evict_first")
        return w, xv

    @triton.jit
    def _sparse_compact_part(q, slot_ptr, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr,
                             scale_ptr, ws_ptr, N, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                             CH: tl.constexpr, G: tl.constexpr, HAS_SCALE: tl.constexpr,
                             DYN: tl.constexpr, DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
        """Tile (n, kc) over the KEPT rows only: the program compacts its chunk's kept channels
        into its own scratch slot (cumsum + scatter; no other program touches the slot), then
        walks them G at a time: dropped rows cost neither traffic nor arithmetic.
        Batch 1: the next group's loads are issued before the current group's FMAs, so two
        groups are in flight per program (faster than one at every shape measured,
        docs/kernel-notes.md v7); DYN: a run-time loop over ceil(count / G) groups instead of
        CH / G unrolled groups each behind an `if`."""
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
        tl.store(slot_ptr + pos, offs_c, mask=kany > 0)
        # the slot is written and read back by different threads of this program: a CTA
        # barrier orders global stores before loads within the CTA (same SM, same L1)
        tl.debug_barrier()
        if M_PAD == 1:
            # (G, BN) accumulator: one FMA per loaded element, one reduction at the end;
            # w, xv: the group being multiplied (the next one is loaded first)
            acc2 = tl.zeros([G, BLOCK_N], dtype=tl.float32)
            w, xv = _slot_group(0, cnt, slot_ptr, x_ptr, w_ptr, stride_wk, offs_n, n_ok, G)
            if DYN:
                for g0 in range(G, cnt + G, G):
                    w_n, xv_n = _slot_group(g0, cnt, slot_ptr, x_ptr, w_ptr, stride_wk,
                                            offs_n, n_ok, G)
                    acc2 += w.to(tl.float32) * xv[:, None]
                    w, xv = w_n, xv_n
            else:
                for g in tl.static_range(1, CH // G):
                    if (g - 1) * G < cnt:
                        w_n, xv_n = _slot_group(g * G, cnt, slot_ptr, x_ptr, w_ptr,
                                                stride_wk, offs_n, n_ok, G)
                        acc2 += w.to(tl.float32) * xv[:, None]
                        w, xv = w_n, xv_n
                if (CH // G - 1) * G < cnt:  # every group kept: the last one
                    acc2 += w.to(tl.float32) * xv[:, None]
            _put(ws_ptr + offs_n, tl.sum(acc2, axis=0), n_ok, DET)
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
            _put(ws_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                 m_ok[:, None] & n_ok[None, :], DET)

    @triton.jit
    def _sparse_part(q, slot_ptr, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr_ptr, thr_val,
                     scale_ptr, ws_ptr, N, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, CH: tl.constexpr,
                     G: tl.constexpr, COMPACT: tl.constexpr, DYN: tl.constexpr,
                     THR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
        """The part's sparse program q."""
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        if COMPACT:
            _sparse_compact_part(q, slot_ptr, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr,
                                 scale_ptr, ws_ptr, N, M_PAD, BLOCK_N, CH, G, HAS_SCALE, DYN,
                                 DOT_UPCAST, DET)
        else:
            _sparse_plain_part(q, x_ptr, stride_xm, M, K, w_ptr, stride_wk, thr, scale_ptr,
                               ws_ptr, N, M_PAD, BLOCK_N, BLOCK_K, K_ITERS, HAS_SCALE,
                               DOT_UPCAST, DET)

    @triton.jit
    def _ws_sum(ws_ptr, b, N, offs, ok, n_slots, bias_ptr, HAS_BIAS: tl.constexpr,
                DET: tl.constexpr):
        """Row b of a part's fp32 sums at offs (grid dim 1: the rows): the workspace plus the
        bias. DET: ws holds n_slots partial sums (n_slots, M, N), added in a fixed order."""
        if DET:
            v = _slot_sum(ws_ptr + b * N, n_slots, tl.num_programs(1) * N, offs, ok, 8)
        else:
            v = tl.load(ws_ptr + b * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            v += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        return v

    @triton.jit
    def _epilogue_part(q, b, ws_ptr, y_ptr, stride_ym, bias_ptr, N, n_slots,
                       BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr, RTNE_FIX: tl.constexpr,
                       DET: tl.constexpr):
        """y[b, block] = cast(ws[b, block] + bias); ws[b, block] = 0 (DET: every call rewrites
        the slots, nothing to zero)."""
        offs = q * BLOCK_E + tl.arange(0, BLOCK_E)
        ok = offs < N
        v = _round_out(_ws_sum(ws_ptr, b, N, offs, ok, n_slots, bias_ptr, HAS_BIAS, DET), RTNE_FIX)
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
                      N, R, n_kc, TP: tl.constexpr, HS: tl.constexpr,
                      M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KR: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_KP: tl.constexpr, LR_KS: tl.constexpr,
                      LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr, LR_FUSED: tl.constexpr,
                      LR_G: tl.constexpr, DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
        """Low-rank program q of a part. DET: its partial sums go to workspace slot n_kc + (its
        rank chunk)."""
        ws_out = _own_slot(ws_ptr, n_kc, q, M, N, BLOCK_N, DET)
        _lowrank_any_part(q, x_ptr, stride_xm, M, K, thr, tv, sc, dn, sdn, up, sup, z_ptr, ws_out,
                          N, R, M_PAD, BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP, LR_KS, LR_NG,
                          BLOCK_NL, LR_FUSED, LR_G, TP, HS, DOT_UPCAST, DET)

    @triton.jit
    def _sparse_tile(q, slot, x_ptr, stride_xm, M, K, w, sw, thr, tv, sc, ws_ptr, N,
                     TP: tl.constexpr, HS: tl.constexpr,
                     M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     K_ITERS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                     COMPACT: tl.constexpr, DYN: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, DET: tl.constexpr):
        """Sparse program q of a part. DET: its partial sums go to workspace slot (its input
        chunk)."""
        ws_out = _own_slot(ws_ptr, 0, q, M, N, BLOCK_N, DET)
        _sparse_part(q, slot, x_ptr, stride_xm, M, K, w, sw, thr, tv, sc, ws_out, N, M_PAD,
                     BLOCK_N, BLOCK_K, K_ITERS, CH, G, COMPACT, DYN, TP, HS, DOT_UPCAST, DET)

    @triton.jit
    def _main_kernel(x_ptr, stride_xm, M, K, ws_ptr, z_ptr, slot_ptr, n_kc, n_sp,
                     w0, sw0, thr0, tv0, sc0, dn0, sdn0, up0, sup0, N0, R0, wo0, zo0, LE0, SE0,
                     w1, sw1, thr1, tv1, sc1, dn1, sdn1, up1, sup1, N1, R1, wo1, zo1, LE1, SE1,
                     w2, sw2, thr2, tv2, sc2, dn2, sdn2, up2, sup2, N2, R2, wo2, zo2, LE2,
                     TP0: tl.constexpr, HS0: tl.constexpr, HL0: tl.constexpr,
                     TP1: tl.constexpr, HS1: tl.constexpr, HL1: tl.constexpr,
                     TP2: tl.constexpr, HS2: tl.constexpr, HL2: tl.constexpr,
                     NUM_PARTS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, BLOCK_KR: tl.constexpr,
                     CH: tl.constexpr, G: tl.constexpr, COMPACT: tl.constexpr,
                     DYN: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_KP: tl.constexpr, LR_KS: tl.constexpr,
                     LR_NG: tl.constexpr, BLOCK_NL: tl.constexpr, LR_FUSED: tl.constexpr,
                     LR_G: tl.constexpr, LR_LAST: tl.constexpr,
                     DOT_UPCAST: tl.constexpr, USE_PDL: tl.constexpr, AFTER_Z: tl.constexpr,
                     DET: tl.constexpr):
        """[low-rank tiles p0 | p1 | p2][sparse tiles p0 | p1 | p2] (LR_LAST: the sparse tiles
        first, so the low-rank tiles, which wait for the z kernel, are scheduled last and fill
        the sparse tiles' tail instead of holding SM slots while they wait); fp32 partials ->
        ws. n_sp: the number of sparse tiles."""
        pid = tl.program_id(0)
        if LR_LAST:
            is_lr = pid >= n_sp
            lq = pid - n_sp
            q = pid
        else:
            is_lr = pid < LE2
            lq = pid
            q = pid - LE2
        if is_lr:
            # low-rank tiles read z, written by the z kernel just before (or, LR_FUSED, x and
            # the zeroed ws, written earlier): wait for the preceding grid
            _pdl_wait(USE_PDL)
            _pdl_release(USE_PDL)
            if lq < LE0:
                if HL0:
                    _lowrank_tile(lq, x_ptr, stride_xm, M, K, thr0, tv0, sc0, dn0, sdn0, up0,
                                  sup0, z_ptr + zo0, ws_ptr + wo0, N0, R0, n_kc, TP0, HS0, M_PAD,
                                  BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP, LR_KS, LR_NG, BLOCK_NL,
                                  LR_FUSED, LR_G, DOT_UPCAST, DET)
            elif lq < LE1:
                if NUM_PARTS > 1:
                    if HL1:
                        _lowrank_tile(lq - LE0, x_ptr, stride_xm, M, K, thr1, tv1, sc1, dn1,
                                      sdn1, up1, sup1, z_ptr + zo1, ws_ptr + wo1, N1, R1, n_kc,
                                      TP1, HS1, M_PAD, BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP,
                                      LR_KS, LR_NG, BLOCK_NL, LR_FUSED, LR_G, DOT_UPCAST, DET)
            else:
                if NUM_PARTS > 2:
                    if HL2:
                        _lowrank_tile(lq - LE1, x_ptr, stride_xm, M, K, thr2, tv2, sc2, dn2,
                                      sdn2, up2, sup2, z_ptr + zo2, ws_ptr + wo2, N2, R2, n_kc,
                                      TP2, HS2, M_PAD, BLOCK_N, BLOCK_KR, BLOCK_R, BLOCK_KP,
                                      LR_KS, LR_NG, BLOCK_NL, LR_FUSED, LR_G, DOT_UPCAST, DET)
        else:
            # Sparse tiles read x, the thresholds and the zeroed ws, all written before the
            # grid that precedes this one. Without a z kernel in between, that grid may still be
            # running: wait. After the z kernel, they are complete (the z kernel waited for them
            # before it released this grid), so these tiles overlap the z kernel.
            if not AFTER_Z:
                _pdl_wait(USE_PDL)
            _pdl_release(USE_PDL)
            slot = slot_ptr + q * CH
            if q < SE0:
                _sparse_tile(q, slot, x_ptr, stride_xm, M, K, w0, sw0, thr0, tv0, sc0,
                             ws_ptr + wo0, N0, TP0, HS0, M_PAD, BLOCK_N, BLOCK_K, K_ITERS, CH, G,
                             COMPACT, DYN, DOT_UPCAST, DET)
            elif q < SE1:
                if NUM_PARTS > 1:
                    _sparse_tile(q - SE0, slot, x_ptr, stride_xm, M, K, w1, sw1, thr1, tv1, sc1,
                                 ws_ptr + wo1, N1, TP1, HS1, M_PAD, BLOCK_N, BLOCK_K, K_ITERS,
                                 CH, G, COMPACT, DYN, DOT_UPCAST, DET)
            else:
                if NUM_PARTS > 2:
                    _sparse_tile(q - SE1, slot, x_ptr, stride_xm, M, K, w2, sw2, thr2, tv2, sc2,
                                 ws_ptr + wo2, N2, TP2, HS2, M_PAD, BLOCK_N, BLOCK_K, K_ITERS,
                                 CH, G, COMPACT, DYN, DOT_UPCAST, DET)

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
