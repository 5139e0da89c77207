"""Device code of one part's sparse term, x[kept channels] @ w_t: a program per (column tile,
input chunk), either over row tiles of w_t loaded predicated on the keep mask
(``_sparse_plain_part``, "TEAL-style") or over the chunk's kept rows only, compacted into the
program's scratch slot (``_sparse_compact_part``, COMPACT). ``_sparse_part`` picks one. The
kernels (rsparse_device_kernels.py) call them once per part; the design is described in
triton_rsparse.py.

Defined only with triton (optional_triton.py).
"""

from __future__ import annotations

from .optional_triton import _HAS_TRITON, tl, triton

if _HAS_TRITON:
    from .rsparse_device_common import _load_thr, _load_x1, _load_xm, _mac1, _macm, _put

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
