"""Device code of the 4-bit R-Sparse decode kernel: the 4-bit sparse tiles and the main kernel
that runs them beside the low-rank tiles. Design notes and the host side: triton_int4.py; the
weight format: rsparse/core/int4.py.

The low-rank factors stay 16-bit, so the z kernel, the low-rank tiles and the epilogue are the
16-bit kernel's own (rsparse_device_*.py); only the sparse tiles are new here. triton is optional:
without it this module imports and defines nothing.
"""

from __future__ import annotations

from .optional_triton import _HAS_TRITON, tl, triton

if _HAS_TRITON:
    # shared with the 16-bit kernel
    from .rsparse_device_common import _load_thr, _load_x1, _load_xm, _pdl_release, _pdl_wait
    from .rsparse_device_lowrank import _lowrank_part

    # ------------------------------------------------------------------ unpacking a nibble

    @triton.jit
    def _mant(w, k: tl.constexpr):
        """fp32 1 + q / 16 for nibble k of the int32 words w: the code moved into mantissa bits
        19-22 of 1.0 by a shift and one masked OR (exact). An int-to-float conversion would run
        at 1/8 of the FMA rate on Hopper (16 per clock and SM); this is two integer ops."""
        if 4 * k <= 19:
            t = w << (19 - 4 * k)
        else:
            t = w >> (4 * k - 19)
        return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _byte_mant(src, j: tl.constexpr, ASM: tl.constexpr):
        """fp32 1 + q / 128 from byte j of src, which holds 0x80 | q: that byte moved under
        0x3F (bits 0x3F80_0000 | q << 16, exact), one PRMT on the GPU (ASM; the interpreter
        runs no PTX: the same bits by shifts)."""
        if ASM:
            if j == 0:
                bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x3F000000, 0x7054;", "=r,r",
                                                 [src], dtype=tl.int32, is_pure=True, pack=1)
            elif j == 1:
                bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x3F000000, 0x7154;", "=r,r",
                                                 [src], dtype=tl.int32, is_pure=True, pack=1)
            elif j == 2:
                bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x3F000000, 0x7254;", "=r,r",
                                                 [src], dtype=tl.int32, is_pure=True, pack=1)
            else:
                bits = tl.inline_asm_elementwise("prmt.b32 $0, $1, 0x3F000000, 0x7354;", "=r,r",
                                                 [src], dtype=tl.int32, is_pure=True, pack=1)
        else:
            bits = (((src >> (8 * j)) & 0xFF) << 16) | 0x3F000000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _operand(w, k: tl.constexpr, OPND: tl.constexpr, DOT_UPCAST: tl.constexpr):
        """Tensor-core operand for nibble k: OFF + q, exact. OPND 1: bf16 128 + q, 2: fp16
        1024 + q (the code OR-ed into the mantissa of 128 / 1024, no conversion instruction);
        0: fp32 q. DOT_UPCAST: the 16-bit value as fp32 (the interpreter's bf16 dot is wrong)."""
        q = (w >> (4 * k)) & 0xF
        if OPND == 0:
            v = q.to(tl.float32)
        elif OPND == 1:
            v = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        if DOT_UPCAST:
            v = v.to(tl.float32)
        return v

    # ------------------------------------------------------------------ batch 1: FMA walk

    @triton.jit
    def _rows1(g0, cnt, slot_ptr, x_ptr, qw_ptr, stride_q, offs_w, w_ok, G: tl.constexpr):
        """Packed rows (G, BW) and x values of kept ranks g0 .. g0 + G - 1 (from the slot);
        ranks past cnt load nothing (x 0, so they add nothing)."""
        r = g0 + tl.arange(0, G)
        r_ok = r < cnt
        rows = tl.load(slot_ptr + r, mask=r_ok, other=0)
        xv = tl.load(x_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
        w = tl.load(qw_ptr + rows[:, None] * stride_q + offs_w[None, :],
                    mask=r_ok[:, None] & w_ok[None, :], other=0, eviction_policy="evict_first")
        return w.to(tl.int32), xv

    @triton.jit
    def _code(w, ev, od, k: tl.constexpr, MANT: tl.constexpr, ASM: tl.constexpr):
        """f(q_k) of nibble k: MANT 0: 1 + q / 16 (_mant, two integer ops); 1: 1 + q / 128
        (byte k // 2 of ev / od, the even / odd nibbles spread into bytes 0x80 | q once per
        word: one byte permute per nibble)."""
        if MANT == 0:
            return _mant(w, k)
        elif k % 2 == 0:
            return _byte_mant(ev, k // 2, ASM)
        else:
            return _byte_mant(od, k // 2, ASM)

    @triton.jit
    def _fma(a0, a1, a2, a3, a4, a5, a6, a7, w, xb, MANT: tl.constexpr, ASM: tl.constexpr):
        """a_k += xb * f(q_k) for the 8 nibbles of each int32 word of w (see _code)."""
        ev = (w & 0x0F0F0F0F) | -0x7F7F7F80  # | 0x80808080 (as an int32)
        od = ((w >> 4) & 0x0F0F0F0F) | -0x7F7F7F80
        a0 += xb * _code(w, ev, od, 0, MANT, ASM)
        a1 += xb * _code(w, ev, od, 1, MANT, ASM)
        a2 += xb * _code(w, ev, od, 2, MANT, ASM)
        a3 += xb * _code(w, ev, od, 3, MANT, ASM)
        a4 += xb * _code(w, ev, od, 4, MANT, ASM)
        a5 += xb * _code(w, ev, od, 5, MANT, ASM)
        a6 += xb * _code(w, ev, od, 6, MANT, ASM)
        a7 += xb * _code(w, ev, od, 7, MANT, ASM)
        return a0, a1, a2, a3, a4, a5, a6, a7

    # ------------------------------------------------------------------ batch 2-8: tl.dot

    @triton.jit
    def _rows_m(rows, r_ok, x_ptr, stride_xm, offs_m, m_ok, scale_ptr, thr, qw_ptr, stride_q,
                offs_w, w_ok, HAS_SCALE: tl.constexpr, COMPACT: tl.constexpr):
        """Packed rows (G, BW) and the rows' kept x values (M_PAD, G), each batch row with its
        own mask. Not COMPACT: consecutive rows, fetched where any batch row keeps them."""
        ok = m_ok[:, None] & r_ok[None, :]
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=ok,
                     other=0.0).to(tl.float32)
        score = tl.abs(xv)
        if HAS_SCALE:
            score = score * tl.load(scale_ptr + rows, mask=r_ok, other=0.0)[None, :]
        keep = (score > thr) & ok
        if not COMPACT:
            r_ok = tl.max(keep.to(tl.int32), axis=0) > 0
        w = tl.load(qw_ptr + rows[:, None] * stride_q + offs_w[None, :],
                    mask=r_ok[:, None] & w_ok[None, :], other=0, eviction_policy="evict_first")
        return w.to(tl.int32), tl.where(keep, xv, 0.0)

    @triton.jit
    def _dot(a0, a1, a2, a3, a4, a5, a6, a7, w, xk, OPND: tl.constexpr, DOT_UPCAST: tl.constexpr):
        """a_k (M_PAD, BW) += xk (M_PAD, G) @ (OFF + q_k) (G, BW) on the tensor cores."""
        if OPND == 0 or DOT_UPCAST:
            a0 = tl.dot(xk, _operand(w, 0, OPND, DOT_UPCAST), a0, input_precision="ieee")
            a1 = tl.dot(xk, _operand(w, 1, OPND, DOT_UPCAST), a1, input_precision="ieee")
            a2 = tl.dot(xk, _operand(w, 2, OPND, DOT_UPCAST), a2, input_precision="ieee")
            a3 = tl.dot(xk, _operand(w, 3, OPND, DOT_UPCAST), a3, input_precision="ieee")
            a4 = tl.dot(xk, _operand(w, 4, OPND, DOT_UPCAST), a4, input_precision="ieee")
            a5 = tl.dot(xk, _operand(w, 5, OPND, DOT_UPCAST), a5, input_precision="ieee")
            a6 = tl.dot(xk, _operand(w, 6, OPND, DOT_UPCAST), a6, input_precision="ieee")
            a7 = tl.dot(xk, _operand(w, 7, OPND, DOT_UPCAST), a7, input_precision="ieee")
        else:
            if OPND == 1:  # exact: x's own dtype
                xo = xk.to(tl.bfloat16)
            else:
                xo = xk.to(tl.float16)
            a0 = tl.dot(xo, _operand(w, 0, OPND, False), a0)
            a1 = tl.dot(xo, _operand(w, 1, OPND, False), a1)
            a2 = tl.dot(xo, _operand(w, 2, OPND, False), a2)
            a3 = tl.dot(xo, _operand(w, 3, OPND, False), a3)
            a4 = tl.dot(xo, _operand(w, 4, OPND, False), a4)
            a5 = tl.dot(xo, _operand(w, 5, OPND, False), a5)
            a6 = tl.dot(xo, _operand(w, 6, OPND, False), a6)
            a7 = tl.dot(xo, _operand(w, 7, OPND, False), a7)
        return a0, a1, a2, a3, a4, a5, a6, a7

    # ------------------------------------------------------------------ scales, zeros, output

    @triton.jit
    def _finish(acc, k: tl.constexpr, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N,
                SCL: tl.constexpr, OFF: tl.constexpr, M_PAD: tl.constexpr):
        """Outputs k * N / 8 + i (plane k of the words i):
        sum_j x_j W_jn = s * (SCL * acc - (OFF + 8) * xs) + z * xs, where acc = sum_j x_j
        (OFF + q_jn) / SCL and xs = sum_j x_j over the kept channels: the group's scale and zero
        leave the inner loop (one load and two FMAs per column)."""
        cols = k * (N // 8) + offs_w
        s = tl.load(sz_ptr + cols * 2, mask=w_ok, other=0.0).to(tl.float32)
        z = tl.load(sz_ptr + cols * 2 + 1, mask=w_ok, other=0.0).to(tl.float32)
        if M_PAD == 1:
            if len(acc.shape) == 2:  # (G, BW): the walk's rows still to be added
                a = tl.sum(acc, axis=0)
            else:
                a = acc
            v = s * (SCL * a - (OFF + 8.0) * xs) + z * xs
            tl.atomic_add(ws_ptr + cols, v, mask=w_ok, sem="relaxed")
        else:
            xb = xs[:, None]
            v = s[None, :] * (acc - (OFF + 8.0) * xb) + z[None, :] * xb
            tl.atomic_add(ws_ptr + offs_m[:, None] * N + cols[None, :], v,
                          mask=m_ok[:, None] & w_ok[None, :], sem="relaxed")

    @triton.jit
    def _finish_all(a0, a1, a2, a3, a4, a5, a6, a7, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m,
                    m_ok, N, SCL: tl.constexpr, OFF: tl.constexpr, M_PAD: tl.constexpr):
        _finish(a0, 0, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a1, 1, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a2, 2, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a3, 3, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a4, 4, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a5, 5, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a6, 6, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)
        _finish(a7, 7, xs, sz_ptr, ws_ptr, offs_w, w_ok, offs_m, m_ok, N, SCL, OFF, M_PAD)

    # ------------------------------------------------------------------ one sparse tile

    @triton.jit
    def _int4_tile(q, slot_ptr, x_ptr, stride_xm, M, K, qw_ptr, stride_q, sz_ptr, thr_ptr,
                   thr_val, scale_ptr, ws_ptr, N, THR_IS_PTR: tl.constexpr,
                   HAS_SCALE: tl.constexpr, GS: tl.constexpr, M_PAD: tl.constexpr,
                   BLOCK_N: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                   COMPACT: tl.constexpr, OPND: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   ROWS1D: tl.constexpr, MANT: tl.constexpr, ASM: tl.constexpr):
        """Tile (column tile n, chunk kc of CH input channels inside one group): the chunk's
        kept channels times their 4-bit rows, scaled by the group's scale/zero, added into the
        fp32 workspace. A chunk nobody keeps costs its x load and nothing else."""
        thr = _load_thr(thr_ptr, thr_val, THR_IS_PTR)
        n_tiles = tl.cdiv(N, BLOCK_N)
        n = q % n_tiles
        kc = q // n_tiles
        offs_w = n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        w_ok = offs_w < N // 8
        offs_c = kc * CH + tl.arange(0, CH)
        sz_ptr += ((kc * CH) // GS) * N * 2  # the group's (out, 2) row
        offs_m = tl.arange(0, M_PAD)
        m_ok = offs_m < M
        if M_PAD == 1:
            xc, keepc, okc = _load_x1(x_ptr, scale_ptr, offs_c, K, thr, HAS_SCALE)
            kany = keepc.to(tl.int32)
            xs = tl.sum(tl.where(keepc, xc, 0.0), axis=0)
        else:
            xcm, keepcm, okcm = _load_xm(x_ptr, stride_xm, scale_ptr, offs_c, K, M, thr, M_PAD,
                                         HAS_SCALE)
            kany = tl.max(keepcm.to(tl.int32), axis=0)  # union over the batch rows
            xs = tl.sum(tl.where(keepcm, xcm, 0.0), axis=1)  # (M_PAD,): each row's own mask
        cnt = tl.sum(kany, 0)
        if cnt > 0:
            if COMPACT:
                # kept channels -> this program's slot (cumsum + scatter); a CTA barrier orders
                # the slot's global stores before other threads of the program read it back
                pos = tl.cumsum(kany, 0) - 1
                tl.store(slot_ptr + pos, offs_c, mask=kany > 0)
                tl.debug_barrier()
            if M_PAD == 1 and ROWS1D:
                # FMA walk, one kept row at a time in a G-row unrolled body: each thread holds
                # its columns' words of every row in flight (G loads deep) and its own sums, so
                # no cross-thread reduction is left at the end
                a0 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a1 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a2 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a3 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a4 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a5 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a6 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                a7 = tl.zeros([BLOCK_N // 8], dtype=tl.float32)
                for g0 in range(0, cnt, G):
                    for i in tl.static_range(G):
                        # ranks past cnt: x 0 and no weight fetched (g0 + i < CH: in the slot)
                        ok = g0 + i < cnt
                        row = tl.where(ok, tl.load(slot_ptr + g0 + i), 0)
                        xv = tl.where(ok, tl.load(x_ptr + row).to(tl.float32), 0.0)
                        w = tl.load(qw_ptr + row * stride_q + offs_w,
                                    mask=w_ok & (offs_w * 0 + g0 + i < cnt), other=0,
                                    eviction_policy="evict_first").to(tl.int32)
                        a0, a1, a2, a3, a4, a5, a6, a7 = _fma(a0, a1, a2, a3, a4, a5, a6, a7,
                                                              w, xv, MANT, ASM)
                _finish_all(a0, a1, a2, a3, a4, a5, a6, a7, xs, sz_ptr, ws_ptr, offs_w, w_ok,
                            offs_m, m_ok, N, 16.0 + 112.0 * MANT, 16.0 + 112.0 * MANT, M_PAD)
            elif M_PAD == 1:
                # FMA walk over (G, BW) tiles of kept rows, the next tile's loads issued first
                a0 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a1 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a2 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a3 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a4 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a5 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a6 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                a7 = tl.zeros([G, BLOCK_N // 8], dtype=tl.float32)
                w, xv = _rows1(0, cnt, slot_ptr, x_ptr, qw_ptr, stride_q, offs_w, w_ok, G)
                for g0 in range(G, cnt + G, G):
                    w_n, xv_n = _rows1(g0, cnt, slot_ptr, x_ptr, qw_ptr, stride_q, offs_w,
                                       w_ok, G)
                    a0, a1, a2, a3, a4, a5, a6, a7 = _fma(a0, a1, a2, a3, a4, a5, a6, a7, w,
                                                          xv[:, None], MANT, ASM)
                    w, xv = w_n, xv_n
                _finish_all(a0, a1, a2, a3, a4, a5, a6, a7, xs, sz_ptr, ws_ptr, offs_w, w_ok,
                            offs_m, m_ok, N, 16.0 + 112.0 * MANT, 16.0 + 112.0 * MANT, M_PAD)
            else:  # tensor cores; batch rows padded to M_PAD
                a0 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a1 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a2 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a3 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a4 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a5 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a6 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                a7 = tl.zeros([M_PAD, BLOCK_N // 8], dtype=tl.float32)
                if COMPACT:
                    n_rows = cnt
                else:
                    n_rows = CH
                for g0 in range(0, n_rows, G):
                    r = g0 + tl.arange(0, G)
                    if COMPACT:
                        r_ok = r < cnt
                        rows = tl.load(slot_ptr + r, mask=r_ok, other=0)
                    else:
                        r_ok = r < CH
                        rows = kc * CH + r
                    w, xk = _rows_m(rows, r_ok, x_ptr, stride_xm, offs_m, m_ok, scale_ptr, thr,
                                    qw_ptr, stride_q, offs_w, w_ok, HAS_SCALE, COMPACT)
                    a0, a1, a2, a3, a4, a5, a6, a7 = _dot(a0, a1, a2, a3, a4, a5, a6, a7, w,
                                                          xk, OPND, DOT_UPCAST)
                if OPND == 0:
                    _finish_all(a0, a1, a2, a3, a4, a5, a6, a7, xs, sz_ptr, ws_ptr, offs_w,
                                w_ok, offs_m, m_ok, N, 1.0, 0.0, M_PAD)
                elif OPND == 1:
                    _finish_all(a0, a1, a2, a3, a4, a5, a6, a7, xs, sz_ptr, ws_ptr, offs_w,
                                w_ok, offs_m, m_ok, N, 1.0, 128.0, M_PAD)
                else:
                    _finish_all(a0, a1, a2, a3, a4, a5, a6, a7, xs, sz_ptr, ws_ptr, offs_w,
                                w_ok, offs_m, m_ok, N, 1.0, 1024.0, M_PAD)

    # ------------------------------------------------------------------ the main kernel

    @triton.jit
    def _int4_main_kernel(x_ptr, stride_xm, M, K, ws_ptr, z_ptr, slot_ptr, n_sp,
                          qw0, sq0, sz0, thr0, tv0, sc0, up0, sup0, N0, R0, wo0, zo0, LE0, SE0,
                          qw1, sq1, sz1, thr1, tv1, sc1, up1, sup1, N1, R1, wo1, zo1, LE1, SE1,
                          qw2, sq2, sz2, thr2, tv2, sc2, up2, sup2, N2, R2, wo2, zo2, LE2,
                          TP0: tl.constexpr, HS0: tl.constexpr, HL0: tl.constexpr,
                          TP1: tl.constexpr, HS1: tl.constexpr, HL1: tl.constexpr,
                          TP2: tl.constexpr, HS2: tl.constexpr, HL2: tl.constexpr,
                          NUM_PARTS: tl.constexpr, GS: tl.constexpr, M_PAD: tl.constexpr,
                          BLOCK_N: tl.constexpr, CH: tl.constexpr, G: tl.constexpr,
                          COMPACT: tl.constexpr, OPND: tl.constexpr,
                          ROWS1D: tl.constexpr, MANT: tl.constexpr, ASM: tl.constexpr,
                          LR_MPAD: tl.constexpr, LR_BN: tl.constexpr, BLOCK_KR: tl.constexpr,
                          LR_G: tl.constexpr, LR_LAST: tl.constexpr, DOT_UPCAST: tl.constexpr,
                          USE_PDL: tl.constexpr, AFTER_Z: tl.constexpr):
        """[low-rank tiles p0 | p1 | p2][4-bit sparse tiles p0 | p1 | p2] (LR_LAST: sparse tiles
        first); fp32 partial sums -> ws. Same program order and PDL rules as the 16-bit main
        kernel (triton_rsparse.py)."""
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
            _pdl_wait(USE_PDL)  # z comes from the z kernel just before
            _pdl_release(USE_PDL)
            if lq < LE0:
                if HL0:
                    _lowrank_part(lq, up0, sup0, z_ptr + zo0, ws_ptr + wo0, M, N0, R0, 0,
                                  LR_MPAD, LR_BN, BLOCK_KR, LR_G, DOT_UPCAST, False)
            elif lq < LE1:
                if NUM_PARTS > 1:
                    if HL1:
                        _lowrank_part(lq - LE0, up1, sup1, z_ptr + zo1, ws_ptr + wo1, M, N1, R1,
                                      0, LR_MPAD, LR_BN, BLOCK_KR, LR_G, DOT_UPCAST, False)
            else:
                if NUM_PARTS > 2:
                    if HL2:
                        _lowrank_part(lq - LE1, up2, sup2, z_ptr + zo2, ws_ptr + wo2, M, N2, R2,
                                      0, LR_MPAD, LR_BN, BLOCK_KR, LR_G, DOT_UPCAST, False)
        else:
            # x, the thresholds and the zeroed ws were written before the preceding grid; after
            # the z kernel (which waited for them) there is nothing to wait for
            if not AFTER_Z:
                _pdl_wait(USE_PDL)
            _pdl_release(USE_PDL)
            slot = slot_ptr + q * CH
            if q < SE0:
                _int4_tile(q, slot, x_ptr, stride_xm, M, K, qw0, sq0, sz0, thr0, tv0, sc0,
                           ws_ptr + wo0, N0, TP0, HS0, GS, M_PAD, BLOCK_N, CH, G, COMPACT,
                           OPND, DOT_UPCAST, ROWS1D, MANT, ASM)
            elif q < SE1:
                if NUM_PARTS > 1:
                    _int4_tile(q - SE0, slot, x_ptr, stride_xm, M, K, qw1, sq1, sz1, thr1, tv1,
                               sc1, ws_ptr + wo1, N1, TP1, HS1, GS, M_PAD, BLOCK_N, CH, G,
                               COMPACT, OPND, DOT_UPCAST, ROWS1D, MANT, ASM)
            else:
                if NUM_PARTS > 2:
                    _int4_tile(q - SE1, slot, x_ptr, stride_xm, M, K, qw2, sq2, sz2, thr2, tv2,
                               sc2, ws_ptr + wo2, N2, TP2, HS2, GS, M_PAD, BLOCK_N, CH, G,
                               COMPACT, OPND, DOT_UPCAST, ROWS1D, MANT, ASM)
