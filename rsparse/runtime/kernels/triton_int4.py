"""The 4-bit R-Sparse decode kernel (issue #26): host side and public functions.

Same math as the 16-bit kernel (triton_rsparse.py), with W in the 4-bit format of
rsparse/core/int4.py (W[n, j] = (q[j, n] - 8) * scale[g, n] + zero[g, n]); per input row b:

    m[b, j] = |x[b, j]| * score_scale[j] > threshold                      (fp32 compare)
    y[b]    = sum_{j: m[b, j]} x[b, j] W[:, j] + (sum_{j: not m} x[b, j] lr_down[j, :]) @ lr_up

Launches per call (PDL-chained on the GPU, as the 16-bit kernel's): [the 16-bit z kernel, if a
part has a low-rank term] -> the 4-bit main kernel (int4_device.py) -> the 16-bit epilogue
(y = cast(ws + bias), scratch zeroed). Only the sparse tiles differ from the 16-bit kernel:

* A program owns (column tile of BLOCK_N outputs, chunk of CH input channels inside one
  quantisation group). It computes the chunk's keep mask and, if anything is kept, compacts the
  kept channels into its scratch slot and walks their packed rows: BLOCK_N / 8 int32 words per
  row, the kept channel's 4-bit weights for the tile's outputs (8 contiguous runs of them: the
  format's planar nibble order). A chunk with nothing kept reads no weights and no scales.
* The group's scale and zero leave the inner loop: sum_j x_j W_jn = s_n (sum_j x_j q_jn -
  8 xs) + z_n xs with xs = sum_j x_j over the kept channels, so the loop only turns codes into
  numbers and multiplies. Batch 1 (FMAs, each thread summing the columns of its own words over
  G rows per unrolled step): the even and odd nibbles of a word are spread into bytes 0x80 | q
  (three ops per word), then one byte permute per nibble puts a byte under 0x3F: the fp32
  1 + q / 128, exact, with no int-to-float conversion (Hopper runs those at 1/8 of the FMA
  rate); one FMA per weight. Batch 2-8 (tensor cores, rows padded to 16): the code OR-ed into
  the mantissa of bf16 128 or fp16 1024 is the MMA operand OFF + q, exact, and OFF * xs is taken
  off after the loop.
* Batch 2-8 fetch a row if any batch row keeps it (union); each batch row still applies its own
  mask to x. Where that makes the kernel slower than the dense 4-bit path, the per-shape table
  (int4_configs.py) sends the call to PATH "dense": one Triton launch splits x into x*m and
  x*(1-m), then tinygemm (int4_dense.py) and the low-rank products. That needs the part's
  tinygemm packing; calls that pass none stay on the kernel.

Measurements, the variants tried and where the time goes: docs/int4-kernel.md.

Constraints: out % 8 == 0 and in % group == 0 (the format's), every part of a call with the same
group size; lr_down (in, r), lr_up (r, out), bias (out,) in x's dtype, row-contiguous; x fp16,
bf16 or fp32; at most 8 rows. No host synchronisation and no data-dependent launch shape: CUDA-
graph safe. Scratch (fp32 workspace, z, compaction slots) is the 16-bit kernel's: calls are
ordered on one stream, and the first call of a shape must come before a graph capture.
Accumulation is fp32 with atomic adds (the sum order may differ between runs).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from rsparse.core.int4 import GROUP_SIZES, Int4Weight, dequantize
from .int4_configs import pick_config
from .int4_dense import int4_linear
from .optional_triton import _HAS_TRITON, _interpret_mode, triton
# the 16-bit kernel's reference and scratch (same semantics; one scratch for both kernels)
from .rsparse_launch import MAX_PARTS, _scratch, _slot_scratch, split_input
from .triton_rsparse import MAX_BATCH_ROWS, rsparse_decode_linear_reference
from .fused_epilogues import Epilogue, add_rmsnorm_epilogue, apply_epilogue_torch, launch_epilogue

if _HAS_TRITON:
    from .int4_device import _int4_main_kernel
    from .rsparse_device_kernels import _epilogue_kernel, _z_kernel

__all__ = ["int4_decode_linear", "int4_decode_linear_multi", "int4_decode_linear_silu_mul",
           "int4_decode_linear_add_rmsnorm", "int4_decode_linear_reference",
           "int4_decode_linear_multi_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def int4_decode_linear_reference(x, qweight, scales_zeros, threshold, score_scale=None,
                                 lr_down=None, lr_up=None, bias=None) -> torch.Tensor:
    """The 16-bit kernel's torch reference on the dequantized weight (fp32 sums)."""
    w_t = dequantize(Int4Weight(qweight, scales_zeros)).t()
    return rsparse_decode_linear_reference(x, w_t, threshold, score_scale, lr_down, lr_up, bias)


def _part_tuple(part) -> tuple:
    """(qweight, scales_zeros, threshold, score_scale, lr_down, lr_up, bias, packed) from 3-8
    entries (packed: the tinygemm packing for the dense path, or None)."""
    part = tuple(part)
    if not 3 <= len(part) <= 8:
        raise ValueError("each part is (qweight, scales_zeros, threshold[, score_scale[, lr_down"
                         "[, lr_up[, bias[, packed]]]]])")
    return part + (None,) * (8 - len(part))


def int4_decode_linear_multi_reference(x, parts) -> tuple:
    return tuple(int4_decode_linear_reference(x, *_part_tuple(p)[:7]) for p in parts)


class _Part4(NamedTuple):
    """One validated 4-bit projection of a call."""
    qw: torch.Tensor  # packed rows (uint8; viewed as int32 words for the kernel)
    sz: torch.Tensor  # (groups, N, 2) bf16
    group: int
    packed: Optional[torch.Tensor]  # tinygemm packing (dense path) or None
    N: int
    thr_t: Optional[torch.Tensor]  # fp32 one-element tensor on the device, or None (thr_val)
    thr_val: float
    scale: Optional[torch.Tensor]  # fp32 contiguous (K,)
    lr_down: Optional[torch.Tensor]
    lr_up: Optional[torch.Tensor]
    R: int  # 0: no low-rank term
    bias: Optional[torch.Tensor]


def _rows_contiguous(name, t, shape, x):
    if t.dim() != 2 or tuple(t.shape) != tuple(shape) or t.dtype != x.dtype:
        raise ValueError(f"{name} must be a {x.dtype} tensor of shape {tuple(shape)}, got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be row-contiguous, got strides {t.stride()}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device")


def _validate(x, K, qweight, scales_zeros, threshold, score_scale, lr_down, lr_up, bias,
              packed) -> _Part4:
    dev = x.device
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[0] != K:
        raise ValueError(f"qweight must be a ({K}, out // 2) uint8 tensor, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    N = qweight.shape[1] * 2
    groups = scales_zeros.shape[0] if scales_zeros.dim() == 3 else 0
    if (tuple(scales_zeros.shape) != (groups, N, 2) or scales_zeros.dtype != torch.bfloat16
            or not scales_zeros.is_contiguous() or groups == 0 or K % groups):
        raise ValueError(f"scales_zeros must be a contiguous (groups, {N}, 2) bf16 tensor, got "
                         f"{scales_zeros.dtype} {tuple(scales_zeros.shape)}")
    group = K // groups
    if group not in GROUP_SIZES or N % 8:
        raise ValueError(f"group size {group} (one of {GROUP_SIZES}) and out {N} (a multiple "
                         f"of 8) do not fit the 4-bit format")
    if qweight.stride(1) != 1 or qweight.stride(0) % 4 or qweight.data_ptr() % 4:
        raise ValueError("qweight rows must be contiguous and 4-byte aligned")
    if qweight.device != dev or scales_zeros.device != dev:
        raise ValueError("qweight and scales_zeros must be on x's device")
    if (lr_down is None) != (lr_up is None):
        raise ValueError("give both lr_down and lr_up, or neither")
    R = 0
    if lr_down is not None and lr_down.numel() > 0 and lr_up.numel() > 0:
        R = lr_down.shape[1] if lr_down.dim() == 2 else -1
        _rows_contiguous("lr_down", lr_down, (K, R), x)
        _rows_contiguous("lr_up", lr_up, (R, N), x)
    if score_scale is not None:
        if score_scale.numel() != K:
            raise ValueError(f"score_scale must have {K} elements, got {score_scale.numel()}")
        score_scale = score_scale.reshape(K).to(device=dev, dtype=torch.float32).contiguous()
    if bias is not None:
        if bias.numel() != N:
            raise ValueError(f"bias must have {N} elements, got {bias.numel()}")
        bias = bias.reshape(N).contiguous()
    thr_t, thr_val = None, 0.0
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError("threshold tensor must have one element")
        thr_t = threshold.to(device=dev, dtype=torch.float32)
    else:
        thr_val = float(threshold)
    return _Part4(qweight, scales_zeros, group, packed, N, thr_t, thr_val, score_scale,
                  lr_down if R else None, lr_up if R else None, R, bias)


def _run_dense(x2, parts: Sequence[_Part4], ys):
    """PATH "dense": one launch writes x*m_p (and x*(1-m_p) for low-rank parts), then tinygemm
    and the low-rank products (the 16-bit kernel's cuBLAS path, 4-bit)."""
    xk, xd = split_input(x2, parts)
    for i, p in enumerate(parts):
        y = int4_linear(xk[i], p.qw, p.sz, p.packed, p.bias)
        if p.R:  # the low-rank product added by the second GEMM, written into the output
            torch.addmm(y, xd[i] @ p.lr_down, p.lr_up, out=ys[i])
        else:
            ys[i].copy_(y)


def _run_triton(x2, parts: Sequence[_Part4], ys, cfg: dict, epi: Optional[Epilogue] = None):
    M, K = x2.shape
    dev = x2.device
    interp = _interpret_mode()
    m1_fma = M == 1 and not cfg["M1_DOT"]
    M_PAD = 1 if m1_fma else 16
    dot_upcast = bool(interp and x2.dtype != torch.float32)  # the interpreter's 16-bit dot
    OPND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x2.dtype]
    use_pdl = bool(cfg["PDL"]) and not interp and dev.type == "cuda"
    BN, CH, G = cfg["BLOCK_N"], cfg["CH"], cfg["G"]
    if not m1_fma and (G < 16 or BN // 8 < 16):
        raise ValueError("the tensor-core path needs G >= 16 and BLOCK_N >= 128")
    # the low-rank path (z kernel, low-rank tiles) at batch 1: FMA tiles, or (LR_DOT) the
    # tensor-core tiles with the row padded to 16
    LR_MPAD = 16 if (M_PAD > 1 or cfg["LR_DOT"]) else 1
    R_max = max(p.R for p in parts)
    any_lr = R_max > 0
    BLOCK_R = min(cfg["BLOCK_R"], max(16, triton.next_power_of_2(R_max)))
    BLOCK_KR = min(cfg["BLOCK_KR"], max(16, triton.next_power_of_2(R_max)))
    LR_G = min(cfg["LR_G"], BLOCK_KR) if LR_MPAD == 1 else 0
    LR_BN, BLOCK_KP = cfg["LR_BN"], cfg["BLOCK_KP"]
    n_kc = K // CH
    n_kp = triton.cdiv(K, BLOCK_KP)

    # per-part offsets into the shared scratch and the program-id ranges of each kernel
    ws_off, z_off, z_end, lr_end, sp_end = [], [], [], [], []
    n_ws = n_z = zc = lc = sc = 0
    for p in parts:
        b = p
        ws_off.append(n_ws)
        z_off.append(n_z)
        n_ws += M * b.N
        n_z += M * b.R
        if b.R:
            zc += n_kp * triton.cdiv(b.R, BLOCK_R)
            lc += triton.cdiv(b.N, LR_BN) * triton.cdiv(b.R, BLOCK_KR)
        sc += triton.cdiv(b.N, BN) * n_kc
        z_end.append(zc)
        lr_end.append(lc)
        sp_end.append(sc)
    ws, zbuf = _scratch(dev, n_ws, n_z)
    slots = _slot_scratch(dev, sc * CH)
    dummy = ws
    pad = lambda ends: ends + [ends[-1]] * (MAX_PARTS - len(ends))  # noqa: E731
    ze, le, se = pad(z_end), pad(lr_end), pad(sp_end)
    pdl_kw = dict(launch_pdl=True) if use_pdl else {}

    def pv(i, name):
        """Per-part argument (a dummy for parts beyond the call's)."""
        if i >= len(parts):
            return 0 if name in ("sq", "N", "R", "wo", "zo", "sdn", "sup", "sy", "ns") else \
                0.0 if name == "tv" else dummy
        p = b = parts[i]
        return {"qw": p.qw, "sq": p.qw.stride(0), "sz": p.sz,
                "thr": b.thr_t if b.thr_t is not None else dummy, "tv": b.thr_val,
                "sc": b.scale if b.scale is not None else dummy,
                "dn": b.lr_down if b.R else dummy, "sdn": b.lr_down.stride(0) if b.R else 0,
                "up": b.lr_up if b.R else dummy, "sup": b.lr_up.stride(0) if b.R else 0,
                "N": b.N, "R": b.R, "wo": ws_off[i], "zo": z_off[i], "y": ys[i],
                "sy": ys[i].stride(0), "b": b.bias if b.bias is not None else dummy,
                "ns": 1}[name]

    flags = []
    for i in range(MAX_PARTS):
        b = parts[i] if i < len(parts) else None
        flags += [False] * 3 if b is None else [b.thr_t is not None, b.scale is not None, b.R > 0]

    if any_lr:
        zargs = []
        for i in range(MAX_PARTS):
            zargs += [pv(i, n) for n in ("thr", "tv", "sc", "dn", "sdn", "R", "zo")]
            if i < MAX_PARTS - 1:
                zargs.append(ze[i])
        _z_kernel[(z_end[-1],)](
            x2, x2.stride(0), M, K, zbuf, *zargs, *flags, NUM_PARTS=len(parts), M_PAD=LR_MPAD,
            BLOCK_KP=BLOCK_KP, BLOCK_R=BLOCK_R, DOT_UPCAST=dot_upcast, USE_PDL=use_pdl,
            DET=False, num_warps=cfg["Z_WARPS"], num_stages=1, **pdl_kw)
    margs = []
    for i in range(MAX_PARTS):
        margs += [pv(i, n) for n in ("qw", "sq", "sz", "thr", "tv", "sc", "up", "sup", "N", "R",
                                     "wo", "zo")]
        margs.append(le[i])
        if i < MAX_PARTS - 1:
            margs.append(se[i])
    _int4_main_kernel[(lr_end[-1] + sp_end[-1],)](
        x2, x2.stride(0), M, K, ws, zbuf, slots, sp_end[-1], *margs, *flags,
        NUM_PARTS=len(parts), GS=parts[0].group, M_PAD=M_PAD, BLOCK_N=BN, CH=CH, G=G,
        COMPACT=bool(cfg["COMPACT"]) or m1_fma, OPND=OPND, ROWS1D=bool(cfg["ROWS1D"]) and m1_fma,
        MANT=cfg["MANT"], ASM=not interp, LR_MPAD=LR_MPAD, LR_BN=LR_BN, BLOCK_KR=BLOCK_KR,
        LR_G=LR_G, LR_LAST=bool(cfg["LR_LAST"]) and any_lr, DOT_UPCAST=dot_upcast,
        USE_PDL=use_pdl, AFTER_Z=any_lr, num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 1), **pdl_kw)
    rtne_fix = bool(x2.dtype == torch.bfloat16 and interp)
    if epi is not None:
        launch_epilogue(epi, ws, zbuf, n_z, parts, ys, ws_off,
                        [1] * len(parts), rtne_fix=rtne_fix, use_pdl=use_pdl, det=False,
                        block_e=cfg["BLOCK_E"], pdl_kw=pdl_kw)
        return
    BLOCK_E = cfg["BLOCK_E"]
    eargs, e_end, ec = [], [], 0
    for p in parts:
        ec += triton.cdiv(p.N, BLOCK_E)
        e_end.append(ec)
    e_end = pad(e_end)
    for i in range(MAX_PARTS):
        eargs += [pv(i, n) for n in ("y", "sy", "b", "N", "wo", "ns")]
        if i < MAX_PARTS - 1:
            eargs.append(e_end[i])
    has_bias = [i < len(parts) and parts[i].bias is not None for i in range(MAX_PARTS)]
    _epilogue_kernel[(e_end[-1], M)](
        ws, zbuf, n_z, *eargs, *has_bias, NUM_PARTS=len(parts), BLOCK_E=BLOCK_E,
        RTNE_FIX=rtne_fix, USE_PDL=use_pdl, DET=False, num_warps=4, **pdl_kw)


def _decode(x, raw_parts, outs, _config, epi: Optional[Epilogue] = None) -> list:
    """Validate, allocate, dispatch (kernel or dense path); (M, N_p) outputs, or the fused
    epilogue's."""
    if not _HAS_TRITON:
        raise RuntimeError("the 4-bit decode kernel needs triton")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of fp16/bf16/fp32, got {x.dtype}")
    K = x.shape[-1]
    M = math.prod(x.shape[:-1])
    if M > MAX_BATCH_ROWS:
        raise ValueError(f"the 4-bit decode kernel takes at most {MAX_BATCH_ROWS} rows, got {M}")
    if not 1 <= len(raw_parts) <= MAX_PARTS:
        raise ValueError(f"1 to {MAX_PARTS} parts, got {len(raw_parts)}")
    parts = [_validate(x, K, *_part_tuple(rp)) for rp in raw_parts]
    if len({p.group for p in parts}) > 1:
        raise ValueError("every part of a call must have the same group size")
    ys = []
    for p, out in zip(parts, outs):
        N = p.N
        if out is not None and (out.numel() != M * N or out.dtype != x.dtype
                                or out.device != x.device or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of {M}x{N} elements")
        ys.append(torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None
                  else out.view(M, N))
    if M == 0:
        return list(apply_epilogue_torch(epi, ys)) if epi is not None else ys
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    cfg = pick_config(M, K, sum(p.N for p in parts), parts[0].group, _config,
                      has_lr=any(p.R for p in parts))
    if cfg["PATH"] == "dense" and all(p.packed is not None for p in parts):
        _run_dense(x2, parts, ys)
    else:
        parts = [p._replace(qw=p.qw.view(torch.int32)) for p in parts]  # rows as int32 words
        if epi is not None and (epi.kind != "add_rmsnorm" or parts[0].N <= 16384):
            _run_triton(x2, parts, ys, cfg, epi)
            return [ys[0], epi.xn] if epi.kind == "add_rmsnorm" else [ys[0]]
        _run_triton(x2, parts, ys, cfg)
    return list(apply_epilogue_torch(epi, ys)) if epi is not None else ys


def int4_decode_linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor,
                       threshold: Union[float, torch.Tensor],
                       score_scale: Optional[torch.Tensor] = None,
                       lr_down: Optional[torch.Tensor] = None,
                       lr_up: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None,
                       packed: Optional[torch.Tensor] = None, *,
                       out: Optional[torch.Tensor] = None,
                       _config: Optional[dict] = None) -> torch.Tensor:
    """R-Sparse (or, without factors, sparse-only) decode step of one 4-bit layer: x (..., in),
    at most 8 rows; (qweight, scales_zeros) as Int4Weight; threshold a float or a one-element
    tensor (read on the device); packed: the layer's tinygemm packing for the dense path (None:
    always the kernel). Returns (..., out) in x's dtype."""
    (y,) = _decode(x, [(qweight, scales_zeros, threshold, score_scale, lr_down, lr_up, bias,
                        packed)], [out], _config)
    return y.view(*x.shape[:-1], y.shape[-1])


def int4_decode_linear_multi(x: torch.Tensor, parts: Sequence[tuple], *,
                             outs: Optional[Sequence[Optional[torch.Tensor]]] = None,
                             _config: Optional[dict] = None) -> tuple:
    """1-3 4-bit layers sharing x (q/k/v, gate/up) in one set of launches; each part
    (qweight, scales_zeros, threshold[, score_scale[, lr_down[, lr_up[, bias[, packed]]]]]),
    out-widths may differ. Returns one (..., out_p) tensor per part."""
    outs = [None] * len(parts) if outs is None else list(outs)
    if len(outs) != len(parts):
        raise ValueError("outs must have one entry per part")
    ys = _decode(x, list(parts), outs, _config)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)


def int4_decode_linear_silu_mul(x: torch.Tensor, gate: tuple, up: tuple, *,
                                _config: Optional[dict] = None) -> torch.Tensor:
    """silu(gate(x)) * up(x) for two 4-bit layers of equal width, the product in the epilogue."""
    (h,) = _decode(x, [gate, up], [None, None], _config, Epilogue("silu_mul"))
    return h.view(*x.shape[:-1], h.shape[-1])


def int4_decode_linear_add_rmsnorm(x: torch.Tensor, part: tuple, residual: torch.Tensor,
                                   norm_weight: torch.Tensor, eps: float, *,
                                   _config: Optional[dict] = None) -> tuple:
    """(h, xn) with h = residual + layer(x) and xn = norm_weight * rmsnorm(h), the layer a 4-bit
    part (as for int4_decode_linear_multi): o_proj or down_proj, its residual add and the next
    norm in one set of launches (the 16-bit kernel's rsparse_decode_linear_add_rmsnorm)."""
    part = _part_tuple(part)
    N, lead = part[1].shape[1], x.shape[:-1]
    epi = add_rmsnorm_epilogue(x, N, residual, norm_weight, eps)
    h, xn = _decode(x, [part], [None], _config, epi)
    return h.view(*lead, N), xn.view(*lead, N)
