"""Host side of an R-Sparse decode call, once triton_rsparse.py has validated it and picked its
path: the validated part record, the scratch buffers (cached per device and shape, left zero by
each call), and the two paths. ``_run_triton`` lays out each part's share of the
scratch and its program-id ranges, then launches the z, main and epilogue kernels
(rsparse_device_kernels.py; a fused epilogue from fused_epilogues.py instead of the plain one).
``_run_cublas`` splits x into kept and dropped channels with one Triton launch, then runs cuBLAS
products.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional, Sequence

import torch

from .fused_epilogues import Epilogue, launch_epilogue
from .optional_triton import _HAS_TRITON, _interpret_mode, triton
from .rsparse_configs import _next_pow2

if _HAS_TRITON:
    from .rsparse_device_kernels import _epilogue_kernel, _main_kernel, _split_input_kernel, _z_kernel

MAX_PARTS = 3  # the kernels take 1 to 3 parts (arguments suffixed 0, 1, 2)


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
# the two paths
# --------------------------------------------------------------------------------------------

def split_input(x2: torch.Tensor, parts: Sequence) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One Triton launch: per part, x*m_p (kept channels) and, for low-rank parts, x*(1-m_p).
    `parts` need thr_t, thr_val, scale and R (the 16-bit _Part or the 4-bit kernel's)."""
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
    return xk, xd


def _run_cublas(x2: torch.Tensor, parts: Sequence[_Part], ys: Sequence[torch.Tensor]):
    """Dense path for batches where the sparse kernel stops paying: one Triton launch writes
    x*m_p (and x*(1-m_p) for low-rank parts), then cuBLAS: y_p = x*m_p @ w_t_p + bias_p
    (+ (x*(1-m_p) @ lr_down_p) @ lr_up_p)."""
    xk, xd = split_input(x2, parts)
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

