"""Split-KV decode attention (flash-decoding) over a static KV cache, in Triton.

One query token per row attends to the visible slots [lo[b], hi] of its row's cache:

    o[b, h] = softmax(scale * q[b, h] . k[b, g(h), lo[b]:hi+1]) @ v[b, g(h), lo[b]:hi+1]

with g(h) = h // (H / H_kv) (grouped-query attention). Why a kernel: SDPA with a mask reads every
slot of the static cache; on the H200 it took ~12 us per 7B block at 640 slots, whose visible
bytes need ~3. Here the cache is cut into splits of SPLIT slots; one
program per (row, kv head, split) streams its K/V tile once for all the query heads of the group,
and splits beyond hi (the current position) or before lo (left padding, sliding window) read
nothing. A second launch combines the splits' partial softmax (max, sum, weighted values).

Public: :func:`decode_attention` and its torch reference :func:`decode_attention_reference`.
"""

from __future__ import annotations

import math

import torch

from .optional_triton import _HAS_TRITON, _interpret_mode, tl, triton  # triton stays optional

__all__ = ["decode_attention", "decode_attention_reference"]

_LOG2E = 1.4426950408889634


def decode_attention_reference(q, k_cache, v_cache, lo, hi, scale: float) -> torch.Tensor:
    """SDPA over the whole cache with the visibility mask (lo[b] <= slot <= hi); same shapes."""
    b, h, _, _ = q.shape
    slots = torch.arange(k_cache.shape[2], device=q.device)
    visible = (slots[None] >= lo.reshape(-1, 1)) & (slots[None] <= hi.reshape(()))
    return torch.nn.functional.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=visible[:, None, None], scale=scale,
        enable_gqa=k_cache.shape[1] != h)


if _HAS_TRITON:

    @triton.jit
    def _attn_split_kernel(q_ptr, sqb, sqh, k_ptr, v_ptr, skb, skh, sks, lo_ptr, hi_ptr, m_ptr, l_ptr,
                      acc_ptr, qk_scale, HKV, D, NSPLIT,
                      GQ: tl.constexpr, GQ_PAD: tl.constexpr, D_PAD: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, UPCAST: tl.constexpr):
        """Program (row b, kv head g, split sp): partial softmax of the group's GQ query heads
        over the visible slots of [sp * SPLIT, (sp + 1) * SPLIT); m, l in the log2 domain."""
        bg = tl.program_id(0)
        sp = tl.program_id(1)
        b = bg // HKV
        g = bg % HKV
        lo = tl.load(lo_ptr + b).to(tl.int32)
        hi = tl.load(hi_ptr).to(tl.int32)
        start = tl.maximum(sp * SPLIT, lo)
        end = tl.minimum(sp * SPLIT + SPLIT, hi + 1)
        offs_h = tl.arange(0, GQ_PAD)
        h_ok = offs_h < GQ
        heads = g * GQ + offs_h
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        kv_base = b * skb + g * skh
        m = tl.full([GQ_PAD], float("-inf"), dtype=tl.float32)
        l = tl.zeros([GQ_PAD], dtype=tl.float32)
        acc = tl.zeros([GQ_PAD, D_PAD], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_ok = offs_s < end
            kv_offs = kv_base + offs_s[:, None] * sks + offs_d[None, :]
            kv_mask = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
            if UPCAST:  # fp32 inputs, or the interpreter (its 16-bit dot is not exact)
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(s_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile has a visible slot
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        part = (b * HKV * GQ + heads) * NSPLIT + sp  # (row, head, split)
        tl.store(m_ptr + part, m, mask=h_ok)
        tl.store(l_ptr + part, l, mask=h_ok)
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc,
                 mask=h_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attn_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, H, D, NSPLIT,
                        NSPLIT_PAD: tl.constexpr, D_PAD: tl.constexpr):
        """Program (row b, head h): o = sum_sp 2^(m_sp - M) acc_sp / sum_sp 2^(m_sp - M) l_sp."""
        bh = tl.program_id(0)
        offs_sp = tl.arange(0, NSPLIT_PAD)
        sp_ok = offs_sp < NSPLIT
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        m = tl.load(m_ptr + bh * NSPLIT + offs_sp, mask=sp_ok, other=float("-inf"))
        l = tl.load(l_ptr + bh * NSPLIT + offs_sp, mask=sp_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits weigh nothing
        acc = tl.load(acc_ptr + (bh * NSPLIT + offs_sp[:, None]) * D + offs_d[None, :],
                      mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
        denom = tl.sum(w * l, axis=0)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)
        tl.store(o_ptr + bh * D + offs_d, o.to(o_ptr.dtype.element_ty), mask=d_ok)


def _split_size(programs_per_split: int, slots: int) -> int:
    """Slots per split (a power of two, 64-256): at least 64 slots per program, and at most
    ~1024 programs over the whole cache (programs past the visible slots exit at once, but
    each still costs its launch). From `rsparse bench attention --tune` on the H200
    (2026-12-01, bf16, Llama-2-7B and Llama-3-8B heads, batch 1 and 4, caches of 640 and 2048
    slots): within 6% of the best split size at every measured point (docs/decode-engine.md)."""
    split = triton.next_power_of_2(max(1, math.ceil(programs_per_split * slots / 1024)))
    return min(256, max(64, split))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lo: torch.Tensor, hi: torch.Tensor, scale: float,
                     split: int | None = None) -> torch.Tensor:
    """Attention of one query token per row over the slots lo[b] <= slot <= hi of a static cache.

    Args:
        q: (B, H, 1, D), any strides with a unit stride on D; fp16, bf16 or fp32.
        k_cache, v_cache: (B, H_kv, S, D), same dtype, unit stride on D and equal strides; H is
            a multiple of H_kv.
        lo: (B,) integer tensor, first visible slot per row (left padding, sliding window).
        hi: one-element integer tensor, last visible slot (the current position), < S.
        scale: softmax scale.
        split: slots per program (a power of two >= 16; default: _split_size, measured choices
            come from `rsparse bench attention --tune`).

    Returns (B, H, 1, D) in q's dtype. No host synchronisation (CUDA-graph safe); rows with no
    visible slot get zeros.
    """
    if not _HAS_TRITON:
        raise RuntimeError("decode_attention needs triton (pip install triton)")
    B, H, T, D = q.shape
    _, HKV, S, Dk = k_cache.shape
    if T != 1 or Dk != D or k_cache.shape[0] != B or v_cache.shape != k_cache.shape or H % HKV:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit the cache "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention: the caches need a unit stride on the head dim and "
                         "the same strides")
    if q.stride(-1) != 1:
        q = q.contiguous()
    dev = q.device
    GQ = H // HKV
    split = split or _split_size(B * HKV, S)
    if split < 16 or split & (split - 1):
        raise ValueError(f"decode_attention: split must be a power of two >= 16, got {split}")
    nsplit = triton.cdiv(S, split)
    m = torch.empty(B * H * nsplit, device=dev, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * H * nsplit * D, device=dev, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=dev, dtype=q.dtype)
    D_PAD = triton.next_power_of_2(D)
    upcast = q.dtype == torch.float32 or _interpret_mode()
    _attn_split_kernel[(B * HKV, nsplit)](
        q, q.stride(0), q.stride(1), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), lo, hi, m, l, acc, scale * _LOG2E, HKV, D, nsplit,
        GQ=GQ, GQ_PAD=max(16, triton.next_power_of_2(GQ)), D_PAD=max(16, D_PAD), SPLIT=split,
        BLOCK_S=min(split, 64), UPCAST=upcast, num_warps=4, num_stages=2)
    _attn_combine_kernel[(B * H,)](m, l, acc, out, H, D, nsplit,
                              NSPLIT_PAD=max(2, triton.next_power_of_2(nsplit)), D_PAD=D_PAD,
                              num_warps=4)
    return out
