"""The R-Sparse decode kernels the host launches (rsparse_launch.py), for 1 to 3 parts (layers
that share x: q/k/v, gate/up): ``_z_kernel``, ``_main_kernel`` (low-rank and sparse tiles),
``_epilogue_kernel``, and the cuBLAS path's ``_split_input_kernel``. Each splits its program ids
into one range per part and calls the per-part device code (rsparse_device_sparse.py,
rsparse_device_lowrank.py). The design is described in triton_rsparse.py.

Defined only with triton (optional_triton.py).
"""

from __future__ import annotations

from .optional_triton import _HAS_TRITON, tl, triton

if _HAS_TRITON:
    from .rsparse_device_common import _load_thr, _pdl_release, _pdl_wait, _round_out, _ws_sum
    from .rsparse_device_lowrank import _lowrank_any_part, _z_part
    from .rsparse_device_sparse import _sparse_part

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
