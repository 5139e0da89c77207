"""Triton decode kernels for R-Sparse linear layers (kernel v7): host side and public API.

The ``@triton.jit`` device code lives in rsparse_device.py, the tile configs and the
per-shape config table (``_CONFIG_TABLE``) in rsparse_configs.py.

Math (per input row ``b``; ``W ~= A B``, ``w_t = W^T`` (in, out), ``lr_down = B^T`` (in, r),
``lr_up = A^T`` (r, out)):

    m[b, j] = |x[b, j]| * score_scale[j] > threshold          (strict; fp32 compare)
    z[b]    = sum_{j: not m[b, j]} x[b, j] * lr_down[j, :]     (fp32)
    y[b]    = sum_{j: m[b, j]} x[b, j] * w_t[j, :] + z[b] @ lr_up (+ bias)

Public functions: :func:`rsparse_decode_linear` (one layer) and
:func:`rsparse_decode_linear_multi` (2-3 layers that share the input x, e.g. q/k/v or gate/up,
each with its own threshold, score_scale, factors and bias: one set of launches for all of
them), plus their torch references; :func:`rsparse_decode_linear_silu_mul` and
:func:`rsparse_decode_linear_add_rmsnorm` are those calls with a decoder block's next step fused
into the epilogue.

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
   ``w_t``, G at a time with the next group's loads in flight (COMPACT), or loads whole row
   tiles predicated on the mask (plain, "TEAL-style").
   Partial sums go to an fp32 workspace with relaxed atomic adds. (LR_FUSED: low-rank tiles
   that need no z pass; measured slower, kept as an option.)
3. ``_epilogue_kernel``, after ``gdc_wait`` on the main grid: y = cast(ws + bias) in x's
   dtype, ws (and z) zeroed for the next call. (Writing y in the main kernel instead, by the
   last program to finish each column tile, was measured 1.1-1.6x slower per call and removed:
   docs/kernel-notes.md, v5.) :func:`rsparse_decode_linear_silu_mul` and
   :func:`rsparse_decode_linear_add_rmsnorm` replace it with a fused epilogue that also does the
   decoder block's next step (fused_epilogues.py).

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
import threading
from typing import NamedTuple, Optional, Sequence, Union

import torch

# rsparse_device holds the guarded triton import (the module imports without triton) and, with
# triton, the kernels. Private names the tests and the benchmark use through this module are
# re-exported here (the config dicts are the same objects: mutating them reaches _pick_config).
from .rsparse_configs import (  # noqa: F401
    _CONFIG_TABLE,
    _DEFAULT_CONFIGS,
    _LR_DEFAULTS,
    _MODE_DEFAULTS,
    _batch_class,
    _next_pow2,
    _pick_config,
)
from .rsparse_device import _HAS_TRITON, _interpret_mode, tl, triton  # noqa: F401
from .fused_epilogues import MAX_NORM_WIDTH, Epilogue, apply_epilogue_torch, launch_epilogue

if _HAS_TRITON:
    from .rsparse_device import _epilogue_kernel, _main_kernel, _split_input_kernel, _z_kernel

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
# scratch buffers (kept zero between calls by the epilogue)
# --------------------------------------------------------------------------------------------

_SCRATCH: dict = {}
_SCRATCH_LOCK = threading.Lock()


def _scratch(device: torch.device, n_ws: int, n_z: int, det: bool = False):
    """fp32 workspace ws and z, both zero; each call leaves them zero (det: they hold
    per-program slots that every call rewrites, left as they are)."""
    key = (device.type, device.index, n_ws, n_z, det)
    with _SCRATCH_LOCK:
        ent = _SCRATCH.get(key)
        if ent is None:
            ent = dict(ws=torch.zeros(max(n_ws, 1), dtype=torch.float32, device=device),
                       z=torch.zeros(max(n_z, 1), dtype=torch.float32, device=device), det=det)
            _SCRATCH[key] = ent
    return ent["ws"], ent["z"]


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


def _run_triton(x2: torch.Tensor, parts: Sequence[_Part], ys: Sequence[torch.Tensor], cfg: dict,
                epi: Optional[Epilogue] = None):
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
    LR_G = min(cfg["LR_G"], BLOCK_KR) if M_PAD == 1 else 0
    det = bool(cfg["DET"])
    lr_fused = bool(cfg["LR_FUSED"]) and any_lr and not det
    LR_KS = max(BLOCK_KP, cfg["LR_KS"] // BLOCK_KP * BLOCK_KP)
    LR_NG, BLOCK_NL = cfg["LR_NG"], cfg["BLOCK_NL"]
    n_kp = triton.cdiv(K, BLOCK_KP)

    # per-part offsets into the shared scratch and program-id ranges of each kernel. DET: a
    # part's ws holds ws_slots slots (one per input chunk, then one per rank chunk) and its z
    # n_kp slots.
    ws_off, z_off, z_end, lr_end, sp_end, ws_slots = [], [], [], [], [], []
    n_ws = n_z = zc = lc = sc = 0
    for p in parts:
        ws_off.append(n_ws)
        z_off.append(n_z)
        n_tiles = triton.cdiv(p.N, BN)
        n_rc = triton.cdiv(p.R, BLOCK_KR) if p.R else 0
        n_ws += M * p.N * ((n_kc + n_rc) if det else 1)
        n_z += M * p.R * (n_kp if det else 1)
        ws_slots.append(n_kc + n_rc)
        if p.R and lr_fused:
            lc += triton.cdiv(p.R, BLOCK_R) * triton.cdiv(K, LR_KS) * LR_NG
        elif p.R:
            zc += n_kp * triton.cdiv(p.R, BLOCK_R)
            lc += n_tiles * n_rc
        sc += n_tiles * n_kc
        z_end.append(zc)
        lr_end.append(lc)
        sp_end.append(sc)
    ws, zbuf = _scratch(dev, n_ws, n_z, det)
    slots = _slot_scratch(dev, sc * CH) if compact else ws
    dummy = ws

    def part_args(i, names):
        """Per-part argument values (dummies for parts beyond the call's)."""
        p = parts[i] if i < len(parts) else None
        vals = []
        for nm in names:
            if p is None:
                vals.append(0 if nm in ("N", "R", "wo", "zo", "sdn", "sup", "sw", "sy", "ns")
                            else 0.0 if nm == "tv" else dummy)
                continue
            vals.append({
                "w": p.w_t, "sw": p.w_t.stride(0), "thr": p.thr_t if p.thr_t is not None else dummy,
                "tv": p.thr_val, "sc": p.scale if p.scale is not None else dummy,
                "dn": p.lr_down if p.R else dummy, "sdn": p.lr_down.stride(0) if p.R else 0,
                "up": p.lr_up if p.R else dummy, "sup": p.lr_up.stride(0) if p.R else 0,
                "N": p.N, "R": p.R, "wo": ws_off[i], "zo": z_off[i],
                "y": ys[i], "sy": ys[i].stride(0), "b": p.bias if p.bias is not None else dummy,
                "ns": ws_slots[i],
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
    margs = []
    for i in range(MAX_PARTS):
        margs += part_args(i, ("w", "sw", "thr", "tv", "sc", "dn", "sdn", "up", "sup", "N", "R",
                               "wo", "zo"))
        margs.append(le[i])
        if i < MAX_PARTS - 1:
            margs.append(se[i])
    _main_kernel[(last(lr_end) + last(sp_end),)](
        x2, x2.stride(0), M, K, ws, zbuf, slots, n_kc, last(sp_end), *margs, *all_flags,
        NUM_PARTS=n_parts, M_PAD=M_PAD, BLOCK_N=BN, BLOCK_K=BK, K_ITERS=KIT, BLOCK_KR=BLOCK_KR,
        CH=CH, G=G, COMPACT=compact, DYN=bool(cfg["DYN"]), BLOCK_R=BLOCK_R, BLOCK_KP=BLOCK_KP, LR_KS=LR_KS,
        LR_NG=LR_NG, BLOCK_NL=BLOCK_NL, LR_FUSED=lr_fused, LR_G=LR_G, LR_LAST=bool(cfg["LR_LAST"]) and any_lr,
        DOT_UPCAST=dot_upcast,
        USE_PDL=use_pdl, AFTER_Z=any_lr and not lr_fused, DET=det, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl_kw)
    BLOCK_E = cfg["BLOCK_E"]
    has_bias = [i < n_parts and parts[i].bias is not None for i in range(MAX_PARTS)]
    rtne_fix = bool(x2.dtype == torch.bfloat16 and interp)
    if epi is not None:
        launch_epilogue(epi, ws, zbuf, 0 if lr_fused or det else n_z, parts, ys, ws_off,
                        ws_slots, rtne_fix=rtne_fix, use_pdl=use_pdl, det=det, block_e=BLOCK_E,
                        pdl_kw=pdl_kw)
        return
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
            _config: Optional[dict], epi: Optional[Epilogue] = None) -> list:
    """Shared body of the public functions: validate, allocate, dispatch; returns (M, N_p) views.
    With a fused epilogue, its outputs instead (apply_epilogue_torch's), however they were
    computed."""
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
    done = lambda: list(apply_epilogue_torch(epi, ys)) if epi is not None else ys  # noqa: E731
    if M == 0:
        return done()
    if K == 0:
        for p, y in zip(parts, ys):
            y.zero_()
            if p.bias is not None:
                y += p.bias.to(x.dtype)
        return done()
    live = [i for i, p in enumerate(parts) if p.N > 0]
    if not live:
        return done()
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
    elif epi is not None and len(live) == len(parts) and (
            epi.kind != "add_rmsnorm" or parts[0].N <= MAX_NORM_WIDTH):
        _run_triton(x2, run_parts, run_ys, cfg, epi)
        return [ys[0], epi.xn] if epi.kind == "add_rmsnorm" else [ys[0]]
    else:
        _run_triton(x2, run_parts, run_ys, cfg)
    return done()


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


def rsparse_decode_linear_silu_mul(x: torch.Tensor, gate: tuple, up: tuple, *,
                                   _config: Optional[dict] = None) -> torch.Tensor:
    """silu(gate(x)) * up(x) for two R-Sparse layers of equal width that share x (a gated MLP's
    gate_proj and up_proj), in one set of launches: the epilogue computes the product, so no
    kernel runs for it (rsparse.runtime.kernels.fused_epilogues). gate, up: parts as for
    :func:`rsparse_decode_linear_multi`. Returns (..., out) in x's dtype."""
    parts = [_part_tuple(gate), _part_tuple(up)]
    if parts[0][0].shape[-1] != parts[1][0].shape[-1]:
        raise ValueError(f"gate and up must have the same width, got {parts[0][0].shape[-1]} "
                         f"and {parts[1][0].shape[-1]}")
    (h,) = _decode(x, parts, [None, None], _config, Epilogue("silu_mul"))
    return h.view(*x.shape[:-1], h.shape[-1])


def rsparse_decode_linear_add_rmsnorm(x: torch.Tensor, part: tuple, residual: torch.Tensor,
                                      norm_weight: torch.Tensor, eps: float, *,
                                      _config: Optional[dict] = None) -> tuple:
    """(h, xn) with h = residual + layer(x) and xn = norm_weight * rmsnorm(h) (transformers'
    Llama RMSNorm, eps inside the square root), the layer being the R-Sparse part (as for
    :func:`rsparse_decode_linear_multi`): a block's o_proj or down_proj, its residual add and
    the next norm in one set of launches. residual: (..., out) in x's dtype; norm_weight: (out,)."""
    part = _part_tuple(part)
    N = part[0].shape[-1]
    lead = x.shape[:-1]
    if tuple(residual.shape) != (*lead, N) or residual.dtype != x.dtype:
        raise ValueError(f"residual must be a {x.dtype} tensor of shape {(*lead, N)}, got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if norm_weight.numel() != N or norm_weight.device != x.device:
        raise ValueError(f"norm_weight must have {N} elements on {x.device}")
    M = math.prod(lead) if len(lead) else 1
    res2 = residual.reshape(M, N).contiguous()
    epi = Epilogue("add_rmsnorm", res2, norm_weight.reshape(N).to(x.dtype).contiguous(),
                   float(eps), torch.empty(M, N, dtype=x.dtype, device=x.device))
    h, xn = _decode(x, [part], [None], _config, epi)
    return h.view(*lead, N), xn.view(*lead, N)

