"""Kernel configurations of the 4-bit R-Sparse decode kernel (triton_int4.py): base tile configs
per batch class, the per-shape table measured on the H200, and the choice of one config per call.
Plain Python.
"""

from __future__ import annotations

from typing import Optional

# Sparse tiles. Batch 1 ("m1"): each program compacts the kept channels of its chunk (CH input
# channels, inside one quantisation group) and walks their rows (BLOCK_N / 8 int32 words each)
# with FMAs: ROWS1D, G rows per unrolled step, each thread summing its own words' columns; else
# (G, BLOCK_N / 8) tiles, one ahead, summed over the rows at the end. MANT: how a code becomes
# a number (1: byte permute, 0: shift and mask; int4_device.py). Batch 2-8 ("mm"): tl.dot on the
# tensor cores, rows padded to 16, over the compacted union of the batch rows' kept channels
# (COMPACT False: the chunk's rows in order, fetched where any batch row keeps them; measured
# 10-20% slower). M1_DOT: batch 1 on the tensor-core path too.
_BASE = {
    "m1": dict(BLOCK_N=1024, CH=128, G=32, COMPACT=True, ROWS1D=True, MANT=1, M1_DOT=False,
               num_warps=4),
    "mm": dict(BLOCK_N=256, CH=128, G=32, COMPACT=True, ROWS1D=False, MANT=1, M1_DOT=False,
               num_warps=4),
}
# Low-rank path (16-bit factors; the 16-bit kernel's z kernel and low-rank tiles): z programs
# of BLOCK_KP input channels x BLOCK_R ranks; low-rank tiles of BLOCK_KR factor rows x LR_BN
# columns, LR_G rows per FMA step at batch 1; LR_LAST: low-rank tiles after the sparse tiles;
# LR_DOT: at batch 1, the low-rank path on the tensor-core tiles (the row padded to 16).
_LR = {
    "m1": dict(BLOCK_KP=32, BLOCK_R=128, BLOCK_KR=32, LR_G=8, LR_BN=512, LR_LAST=False,
               LR_DOT=False, Z_WARPS=4, BLOCK_E=512),
    "mm": dict(BLOCK_KP=32, BLOCK_R=128, BLOCK_KR=64, LR_G=0, LR_BN=128, LR_LAST=False,
               LR_DOT=True, Z_WARPS=4, BLOCK_E=512),
}
# PDL: programmatic dependent launch between the call's kernels (GPU only). PATH "dense": split
# x into x*m and x*(1-m), then the dense 4-bit product (tinygemm, int4_dense.py) and the
# low-rank products; taken only where the call passes the dense packing.
_MODE = dict(PDL=True, PATH="triton")

# Per-shape choices: (class, in, out) -> config on top of the base, out summed over the parts of
# a fused call, class m1 / m2 / m4 / m8 (batch 1, 2, 3-4, 5-8) with a "+lr" suffix for calls with
# a low-rank term. The per-op winners of `python -m rsparse.runtime.bench.kernel_int4 --tune` on
# the H200, 2026-12-04, run 2 (bf16, s = 0.5, rho = 0.9; docs/int4-kernel.md); unlisted shapes
# take _default().
_ROWS1024 = dict(BLOCK_N=1024, CH=128, G=32, num_warps=4)  # = the m1 base
_ROWS1024_W1 = dict(BLOCK_N=1024, CH=32, G=16, num_warps=1, LR_BN=128)
# R-Sparse: wide tiles over 64-channel chunks, low-rank tiles of 32 factor rows after the sparse
# tiles (or LR_DOT): the low-rank term adds ~2 us to these tiles' sparse-only time, against ~9 us
# beside rows1024's (run 2: 18.2-18.9 us against 23.7-25.0 at the Llama-2 MLP shapes)
_ROWS4096_LR = dict(BLOCK_N=4096, CH=64, G=16, num_warps=4, BLOCK_KR=32, LR_G=8, LR_LAST=True)
_ROWS4096_LRDOT = dict(BLOCK_N=4096, CH=64, G=16, num_warps=4, LR_DOT=True, BLOCK_KR=32)
_COMPACT = dict(COMPACT=True)
_DENSE = dict(PATH="dense")
_TABLE: dict = {
    ("m1", 4096, 4096): _ROWS1024_W1,
    ("m1", 4096, 11008): _ROWS1024,
    ("m1+lr", 4096, 11008): _ROWS4096_LR,
    ("m1", 11008, 4096): _ROWS1024,
    ("m1+lr", 11008, 4096): _ROWS4096_LR,
    ("m1", 4096, 14336): _ROWS1024,
    ("m1+lr", 4096, 14336): _ROWS4096_LR,
    ("m1", 14336, 4096): _ROWS1024,
    ("m1+lr", 14336, 4096): _ROWS4096_LRDOT,
    # batch 2-8 at the Llama-2 MLP shapes: sparse-only takes the dense path (split, tinygemm) at
    # 2-4 rows and the kernel at 5-8; R-Sparse stays on the kernel, faster than its dense path
    ("m2", 4096, 11008): _DENSE,
    ("m2+lr", 4096, 11008): _COMPACT,
    ("m4", 4096, 11008): _DENSE,
    ("m4+lr", 4096, 11008): _COMPACT,
    ("m8", 4096, 11008): _COMPACT,
    ("m2", 11008, 4096): _DENSE,
    ("m2+lr", 11008, 4096): _COMPACT,
    ("m4", 11008, 4096): _DENSE,
    ("m4+lr", 11008, 4096): _COMPACT,
    ("m8", 11008, 4096): _COMPACT,
}


def _default(cls: str, has_lr: bool) -> dict:
    """Unlisted shapes: what won at most measured shapes of the class."""
    if cls == "m1":
        return _ROWS4096_LR if has_lr else {}
    if cls in ("m2", "m4") and not has_lr:
        return _DENSE
    return {}  # the mm base: compacted tensor-core walk


def batch_class(M: int) -> str:
    return "m1" if M == 1 else "m2" if M == 2 else "m4" if M <= 4 else "m8"


def pick_config(M: int, K: int, N: int, group_size: int, override: Optional[dict] = None,
                has_lr: bool = False) -> dict:
    """Base config of the batch class, the per-shape table entry, then the override (tests and
    the benchmark's sweep); CH is cut to the group size (a chunk never spans two groups)."""
    base = "m1" if M == 1 else "mm"
    cfg = dict(_BASE[base])
    cfg.update(_LR[base])
    cfg.update(_MODE)
    if not override:
        cls = batch_class(M)
        entry = _TABLE.get((cls + "+lr", K, N)) if has_lr else None
        if entry is None:
            entry = _TABLE.get((cls, K, N))
        cfg.update(entry if entry is not None else _default(cls, has_lr))
    if override:
        unknown = set(override) - set(cfg) - {"num_stages"}
        if unknown:
            raise ValueError(f"unknown 4-bit kernel config keys {sorted(unknown)}")
        cfg.update(override)
    cfg["CH"] = min(cfg["CH"], group_size)
    if group_size % cfg["CH"] or cfg["CH"] % cfg["G"]:
        raise ValueError(f"CH {cfg['CH']} must divide the group size {group_size} and be a "
                         f"multiple of G {cfg['G']}")
    if cfg["PATH"] not in ("triton", "dense"):
        raise ValueError(f"PATH must be 'triton' or 'dense', got {cfg['PATH']!r}")
    return cfg
