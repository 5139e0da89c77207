"""Device code of one part's low-rank term, z @ lr_up with z = x[dropped channels] @ lr_down:
the z pass (``_z_part``: split-k over the rows of lr_down), the product with lr_up
(``_lowrank_part``), and the variant without a z pass (``_lowrank_fused_part``, LR_FUSED).
``_lowrank_any_part`` picks one of the last two. The kernels (rsparse_device_kernels.py) call
them once per part; the design is described in triton_rsparse.py.

Defined only with triton (optional_triton.py).
"""

from __future__ import annotations

from .optional_triton import _HAS_TRITON, tl, triton

if _HAS_TRITON:
    from .rsparse_device_common import _load_thr, _load_x1, _load_xm, _mac1, _macm, _put, _slot_sum

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
