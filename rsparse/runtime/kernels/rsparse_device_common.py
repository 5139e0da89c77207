"""Device helpers shared by the R-Sparse decode kernels (rsparse_device_*.py) and the fused
epilogues: PDL wait and release, partial sums into the fp32 workspace (relaxed atomic add, or a
program's own slot) and their fixed-order sum, fp32 -> bf16 rounding under the interpreter, the
threshold and masked input loads, and the two multiply-accumulate forms (one row: FMA; several
rows: tl.dot).

Defined only with triton (optional_triton.py).
"""

from __future__ import annotations

from .optional_triton import _HAS_TRITON, tl, triton

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
